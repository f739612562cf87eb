#!/bin/sh
# Make Fashion-MNIST available: already found -> nothing; Debian/Ubuntu as root -> the system package;
# otherwise download it from the official source into the user cache (checksums verified).
set -e
VISREC=${VISREC:-visrec}
if where=$($VISREC data where fashion-mnist 2>/dev/null); then
    echo "fashion-mnist: found in $where"
    exit 0
fi
if [ -f /etc/debian_version ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "fashion-mnist: installing the Debian package dataset-fashion-mnist"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; }; then
        $VISREC data where fashion-mnist >/dev/null && exit 0
    fi
    echo "fashion-mnist: the system package failed; downloading instead"
fi
$VISREC data fetch fashion-mnist

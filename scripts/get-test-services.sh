#!/bin/sh
# Services the tests start themselves: PostgreSQL (Debian's package) for the multi-machine hyperparameter
# search. Found -> nothing; Debian/Ubuntu as root -> installed; otherwise the PostgreSQL tests say they skip.
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "postgresql: found"
    exit 0
fi
if [ -f /etc/debian_version ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "postgresql: installing the Debian package (the tests start their own server on 127.0.0.1)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
             postgresql; } || echo "postgresql: could not be installed; its tests will be skipped"
    # the package may start a cluster of its own: the tests do not need it
    command -v service >/dev/null 2>&1 && service postgresql stop >/dev/null 2>&1
else
    echo "postgresql: not installed and cannot install it here; its tests will be skipped"
fi
exit 0

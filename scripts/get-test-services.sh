#!/bin/sh
# What the tests need beyond Python packages: PostgreSQL (Debian's package) for the multi-machine hyperparameter
# search, whose tests start their own server; Chromium, headless, that Playwright drives to open report.html and
# the served web page. Found -> nothing; Debian/Ubuntu as root -> installed; otherwise the tests that need them
# say they skip.
can_install() {
    [ -f /etc/debian_version ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1
}
install() {  # package...
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; }
}

if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "postgresql: found"
elif can_install; then
    echo "postgresql: installing the Debian package (the tests start their own server on 127.0.0.1)"
    install postgresql || echo "postgresql: could not be installed; its tests will be skipped"
    # the package may start a cluster of its own: the tests do not need it
    command -v service >/dev/null 2>&1 && service postgresql stop >/dev/null 2>&1
else
    echo "postgresql: not installed and cannot install it here; its tests will be skipped"
fi

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    echo "chromium: found"
elif can_install; then
    echo "chromium: installing the Debian package (headless, for the browser tests)"
    install chromium || echo "chromium: could not be installed; the browser tests will be skipped"
else
    echo "chromium: not installed and cannot install it here; the browser tests will be skipped"
fi
exit 0

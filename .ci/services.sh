#!/usr/bin/env bash
# CI services: a redis-server binary for tests/test_redis_store.py and tests/test_tiered.py (the tests
# start their own servers on free loopback ports; nothing is started here). Idempotent and quiet.
set -euo pipefail
if ! command -v redis-server >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
redis-server --version

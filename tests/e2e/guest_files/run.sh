# Runs the test script the harness put into the per-run initramfs overlay, after the helpers.
# shellcheck shell=bash source=/dev/null
cd /tmp || exit 1
. /e2e/lib.sh
. /e2e/test.sh

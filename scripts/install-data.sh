#!/bin/sh
# Installs the offline datasets of the examples and tests from Debian (idempotent):
#   dataset-fashion-mnist -> IDX files under /usr/share/datasets/fashion-mnist
#   bible-kjv-text        -> the King James Bible's data file (/usr/lib/bible.data)
#   bible-kjv             -> the `bible` program that reads it (only a Recommends of bible-kjv-text, so named
#                            here: --no-install-recommends would leave it out)
set -eu
PACKAGES="dataset-fashion-mnist bible-kjv-text bible-kjv"
missing=""
for package in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing="$missing $package"
done
if [ -z "$missing" ]; then
    echo "install-data: already installed:$(printf ' %s' $PACKAGES)"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $missing

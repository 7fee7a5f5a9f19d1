#!/usr/bin/env bash
# Builds the Debian package with cargo-deb: both programs in /usr/bin, both systemd units
# (with /usr/bin paths, neither enabled), the system users `revproxy` and `revproxy-agent`
# (a sysusers.d file), /etc/revproxy/proxy.toml and /etc/revproxy-agent/agent.toml
# (conffiles), and the documentation. What goes in is [package.metadata.deb] in Cargo.toml.
#
#   bash scripts/package.sh              release build of both programs, then the package
#   bash scripts/package.sh --no-build   package target/release/revproxy{,-agent} as they
#                                        are (CI's benchmark step has just built them)
#
# Prints the path of the .deb (target/debian/revproxy_VERSION-1_ARCH.deb) on stdout, and
# what it does on stderr. Installs cargo-deb with `cargo install` if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

build=yes
case "${1:-}" in
"") ;;
--no-build) build=no ;;
-h | --help)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "package.sh: unknown argument '$1' (the one option is --no-build)" >&2
    exit 2
    ;;
esac

# The version the metadata was written for. Without default features it compresses with
# the system's `xz` instead of building liblzma, and reads no build ids (not needed here).
# Measured: 2 minutes with CARGO_BUILD_JOBS=1.
cargo_deb_version=3.8.0
if ! cargo deb --version >/dev/null 2>&1; then
    echo "package.sh: installing cargo-deb $cargo_deb_version (cargo install, about 2 minutes)" >&2
    cargo install cargo-deb --version "$cargo_deb_version" --locked --no-default-features >&2
fi

release="${CARGO_TARGET_DIR:-target}/release"
if [ "$build" = yes ]; then
    cargo build --release --locked --bin revproxy --bin revproxy-agent >&2
fi
for bin in revproxy revproxy-agent; do
    if [ ! -x "$release/$bin" ]; then
        echo "package.sh: $release/$bin is missing: run without --no-build, or first" \
            "cargo build --release --bin revproxy --bin revproxy-agent" >&2
        exit 1
    fi
done
# --no-build packages what is there: say so when it is older than the sources.
newer=$(find src ca/src -name '*.rs' -newer "$release/revproxy" -print -quit)
if [ -n "$newer" ]; then
    echo "package.sh: warning: $newer is newer than $release/revproxy; the package holds the older build" >&2
fi

# The units of examples/systemd/, with the paths of the package: /usr/bin, /usr/share/doc.
# Their header comments say how to install by hand, which the package has done.
units=target/deb-units
rm -rf "$units"
mkdir -p "$units"
for name in revproxy revproxy-agent; do
    src="examples/systemd/$name.service"
    {
        echo "# $name.service of the revproxy package (from $src); install steps and the"
        echo "# commands to run as the service's user: /usr/share/doc/revproxy/operations.md"
        sed -n '/^\[Unit\]/,$p' "$src" |
            sed -e "s#/usr/local/bin/$name #/usr/bin/$name #" -e 's#/usr/local/share/doc/#/usr/share/doc/#'
    } >"$units/$name.service"
    if ! grep -q "^ExecStart=/usr/bin/$name " "$units/$name.service" || grep -q /usr/local "$units/$name.service"; then
        echo "package.sh: $src no longer starts /usr/local/bin/$name (or names another /usr/local" \
            "path): update the paths this script rewrites" >&2
        exit 1
    fi
done

# `cargo deb` prints the path of the package on stdout. --strip: the release profile keeps
# line tables for profiling (bench/profile.py); the package does without, as Debian's do.
cargo deb --no-build --locked --strip

#!/usr/bin/env bash
# Builds the Debian package from the release binaries already built (CI's benchmark step
# makes them: `cargo build --release --bin revproxy --bin revproxy-agent`), installs it with
# dpkg on this machine, checks what it promises, then removes and purges it:
#   - /usr/bin/revproxy and /usr/bin/revproxy-agent run;
#   - both units are in /usr/lib/systemd/system, start /usr/bin/..., run as fixed users,
#     and `systemd-analyze verify` finds nothing wrong with them;
#   - the users `revproxy` and `revproxy-agent` exist, with /var/lib/revproxy{,-agent}
#     (mode 0700) theirs;
#   - /etc/revproxy/proxy.toml and /etc/revproxy-agent/agent.toml are conffiles that
#     `revproxy check` and `revproxy-agent check` accept;
#   - an operator runs `ca init --san`, `token create` and `cert list` as `revproxy` on
#     the service's state directory, and a reinstall keeps that state and the CA;
#   - `dpkg -r` removes the programs and units (the configuration stays), `dpkg --purge`
#     the configuration; the state directory, with the CA key, is left (as documented).
# It needs root and a Debian system with systemd installed (not running: a container is
# fine). It refuses to run where revproxy is installed already, by package or by hand,
# rather than overwrite it, and undoes what it did when it stops, failed or not.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "package-test: $*" >&2; }
fail() {
    echo "package-test: FAILED: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || fail "run as root: it installs the package with dpkg"
for tool in dpkg dpkg-deb systemd-analyze runuser; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is missing (a Debian system with systemd installed is needed)"
done

# What an installed revproxy would have; none of it may exist before the test.
users=(revproxy revproxy-agent)
ours=(
    /usr/bin/revproxy /usr/bin/revproxy-agent
    /usr/lib/systemd/system/revproxy.service /usr/lib/systemd/system/revproxy-agent.service
    /lib/systemd/system/revproxy.service /lib/systemd/system/revproxy-agent.service
    /etc/systemd/system/revproxy.service /etc/systemd/system/revproxy-agent.service
    /usr/lib/sysusers.d/revproxy.conf /etc/sysusers.d/revproxy.conf
    /etc/revproxy /etc/revproxy-agent /var/lib/revproxy /var/lib/revproxy-agent
)
if status=$(dpkg-query -W -f='${Status}' revproxy 2>/dev/null) && [ "$status" != "unknown ok not-installed" ]; then
    fail "the revproxy package is on this machine already ($status): this test would replace and then purge it; remove it first (dpkg --purge revproxy) or run the test elsewhere"
fi
for path in "${ours[@]}"; do
    if [ -e "$path" ]; then
        fail "$path exists: a revproxy installed by hand? This test would overwrite it and then delete it; move it away or run the test elsewhere"
    fi
done
# Users that exist already (from a hand install, say) are kept at the end.
made_users=()
for user in "${users[@]}"; do
    getent passwd "$user" >/dev/null || made_users+=("$user")
done

cleanup() {
    status=$?
    trap - EXIT
    if dpkg-query -W -f='${Status}' revproxy 2>/dev/null | grep -qv "not-installed"; then
        dpkg --purge revproxy >/dev/null 2>&1 || say "cleanup: dpkg --purge revproxy failed"
    fi
    # Nothing of these existed before the test (it refuses otherwise).
    rm -rf /var/lib/revproxy /var/lib/revproxy-agent /etc/revproxy /etc/revproxy-agent
    for user in "${made_users[@]}"; do
        if getent passwd "$user" >/dev/null; then userdel "$user" || say "cleanup: userdel $user failed"; fi
        if getent group "$user" >/dev/null; then groupdel "$user" || say "cleanup: groupdel $user failed"; fi
    done
    if [ "$status" -ne 0 ]; then
        say "cleaned up after the failure: package purged, users and directories it made removed"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "building the package from the release binaries (scripts/package.sh --no-build)"
deb=$(bash scripts/package.sh --no-build | tail -n 1) || fail "scripts/package.sh --no-build failed (its reason is above)"
[ -f "$deb" ] || fail "scripts/package.sh --no-build printed '$deb', which is no file"
version=$(dpkg-deb -f "$deb" Version)
say "installing $deb ($version)"
dpkg -i "$deb" >&2 || fail "dpkg -i $deb failed"

say "checking the programs"
for bin in revproxy revproxy-agent; do
    [ -x "/usr/bin/$bin" ] || fail "/usr/bin/$bin is not installed"
    said=$("/usr/bin/$bin" --version 2>&1) || fail "/usr/bin/$bin --version failed: $said"
    [ "$said" = "$bin ${version%-*}" ] || fail "/usr/bin/$bin --version says '$said', not '$bin ${version%-*}'"
done

say "checking the units"
for unit in revproxy revproxy-agent; do
    file="/usr/lib/systemd/system/$unit.service"
    [ -f "$file" ] || fail "$file is not installed"
    grep -q "^ExecStart=/usr/bin/$unit " "$file" || fail "$file does not start /usr/bin/$unit"
    grep -q "^User=$unit$" "$file" || fail "$file does not run as the user $unit"
    if grep -q "^DynamicUser=" "$file"; then fail "$file still has a dynamic user"; fi
done
said=$(systemd-analyze verify /usr/lib/systemd/system/revproxy.service /usr/lib/systemd/system/revproxy-agent.service 2>&1) ||
    fail "systemd-analyze verify refuses the installed units: $said"
[ -z "$said" ] || fail "systemd-analyze verify warns about the installed units: $said"

say "checking the users and state directories"
for user in "${users[@]}"; do
    entry=$(getent passwd "$user") || fail "the user $user does not exist after the install"
    IFS=: read -r _ _ _ _ _ home shell <<<"$entry"
    [ "$home" = "/var/lib/$user" ] || fail "$user's home is $home, not /var/lib/$user"
    [ "$shell" = /usr/sbin/nologin ] || fail "$user's shell is $shell, not /usr/sbin/nologin"
    owner=$(stat -c '%U:%G %a' "/var/lib/$user" 2>&1) || fail "/var/lib/$user is missing: $owner"
    [ "$owner" = "$user:$user 700" ] || fail "/var/lib/$user is '$owner', not '$user:$user 700'"
done

say "checking the configuration"
conffiles=$(dpkg-query --control-show revproxy conffiles)
for file in /etc/revproxy/proxy.toml /etc/revproxy-agent/agent.toml; do
    [ -f "$file" ] || fail "$file is not installed"
    grep -q "^$file\$" <<<"$conffiles" || fail "$file is no conffile of the package: $conffiles"
done
said=$(/usr/bin/revproxy check --config /etc/revproxy/proxy.toml 2>&1) || fail "revproxy check refuses /etc/revproxy/proxy.toml: $said"
said=$(/usr/bin/revproxy-agent check --config /etc/revproxy-agent/agent.toml 2>&1) || fail "revproxy-agent check refuses /etc/revproxy-agent/agent.toml: $said"

say "checking the operator's first steps, as the user revproxy on /var/lib/revproxy"
as_revproxy() { (cd / && runuser -u revproxy -- env -u REVPROXY_STATE -u REVPROXY_STORE /usr/bin/revproxy "$@"); }
pin=$(as_revproxy ca init --state /var/lib/revproxy --san proxy.example.com 2>&1) || fail "revproxy ca init as revproxy failed: $pin"
[[ "$pin" == sha256:* ]] || fail "revproxy ca init printed '$pin', not the CA pin"
token=$(as_revproxy token create --state /var/lib/revproxy --name web-1 --host app.example.com 2>/dev/null) ||
    fail "revproxy token create as revproxy failed: $(as_revproxy token create --state /var/lib/revproxy --name web-2 --host app.example.com 2>&1)"
[ -n "$token" ] || fail "revproxy token create printed no token"
said=$(as_revproxy cert list --state /var/lib/revproxy 2>&1) || fail "revproxy cert list as revproxy failed: $said"
strangers=$(find /var/lib/revproxy ! -user revproxy)
[ -z "$strangers" ] || fail "files in /var/lib/revproxy that are not the user revproxy's: $strangers"
key=$(sha256sum /var/lib/revproxy/ca.key)

say "reinstalling over it (dpkg -i again): state and configuration stay"
dpkg -i "$deb" >&2 || fail "dpkg -i $deb over an installed revproxy failed"
[ "$(sha256sum /var/lib/revproxy/ca.key)" = "$key" ] || fail "a reinstall changed /var/lib/revproxy/ca.key"
[ "$(stat -c '%U %a' /var/lib/revproxy)" = "revproxy 700" ] || fail "a reinstall changed /var/lib/revproxy's owner or mode"

say "removing it (dpkg -r)"
dpkg -r revproxy >&2 || fail "dpkg -r revproxy failed"
for path in /usr/bin/revproxy /usr/bin/revproxy-agent /usr/lib/systemd/system/revproxy.service \
    /usr/lib/systemd/system/revproxy-agent.service /usr/lib/sysusers.d/revproxy.conf; do
    if [ -e "$path" ]; then fail "dpkg -r left $path"; fi
done
[ -f /etc/revproxy/proxy.toml ] || fail "dpkg -r removed /etc/revproxy/proxy.toml (a conffile: only --purge should)"

say "purging it (dpkg --purge)"
dpkg --purge revproxy >&2 || fail "dpkg --purge revproxy failed"
for path in /etc/revproxy /etc/revproxy-agent; do
    if [ -e "$path" ]; then fail "dpkg --purge left $path"; fi
done
status=$(dpkg-query -W -f='${Status}' revproxy 2>/dev/null || true)
[ -z "$status" ] || [ "$status" = "unknown ok not-installed" ] || fail "after dpkg --purge the package is '$status'"
[ -f /var/lib/revproxy/ca.key ] || fail "dpkg --purge removed /var/lib/revproxy/ca.key (the CA key is kept, as docs/operations.md says)"

say "ok: $deb installs, works as documented, and removes cleanly"

#!/usr/bin/env bash
# Installs the third-party programs the test suite drives, if they are missing:
#   promtool (Debian's `prometheus`): checks the /metrics exposition with Prometheus' parser
#   chromium (Debian's `chromium`):   renders the admin status page headless
#   postgres, psql (Debian's `postgresql`): a real database reached through the mesh
#   ip (Debian's `iproute2`):          network namespaces for the mesh across networks
#   haproxy (Debian's `haproxy`):      a real load balancer in front of the proxies
#   nginx, curl:                       a real backend and client for PROXY protocol tests
#   pebble, pebble-challtestsrv (Debian's `pebble`): a real ACME server and its DNS, for
#                                      certificates ordered by the proxy (tests/terminate/acme.rs)
#   python3 (Debian's `python3`):      an echo backend in a process of its own (ten thousand
#                                      clients held through one agent, tests/stalls.rs)
#   dnsmasq (Debian's `dnsmasq-base`), dig (`bind9-dnsutils`), iperf3:
#                                      a real DNS server and client, and UDP load, through
#                                      granted UDP ports (tests/tunnel/udp.rs)
#   systemd-analyze (Debian's `systemd`), deb-systemd-helper (`init-system-helpers`):
#                                      verify the units; install the Debian package
#                                      (scripts/package-test.sh; systemd need not run)
# Safe to run again and from several processes at once (one installs, the others wait).
# Needs root and Debian's package registry; prints what it does on stderr.
set -euo pipefail

missing() {
    need=()
    command -v promtool >/dev/null 2>&1 || need+=(prometheus)
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
    ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
    command -v ip >/dev/null 2>&1 || need+=(iproute2)
    command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
    command -v curl >/dev/null 2>&1 || need+=(curl)
    command -v python3 >/dev/null 2>&1 || need+=(python3)
    command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
    command -v deb-systemd-helper >/dev/null 2>&1 || need+=(init-system-helpers)
    command -v pebble >/dev/null 2>&1 && command -v pebble-challtestsrv >/dev/null 2>&1 || need+=(pebble)
    command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
    command -v dig >/dev/null 2>&1 || need+=(bind9-dnsutils)
    command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
    [ -f /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
}
missing
[ ${#need[@]} -eq 0 ] && exit 0

exec 9>/tmp/revproxy-test-tools.lock
flock 9
# Another process may have installed them while we waited.
missing
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "test-tools: ${need[*]} missing; run this script as root (sudo $0)" >&2
    exit 1
fi
echo "test-tools: installing ${need[*]} from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${need[@]}" >&2

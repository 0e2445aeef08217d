#!/usr/bin/env bash
# Test hosts on this machine: network namespaces, each with its own address on one bridge, so
# that the "nodes" of a multi-node test talk over a network instead of one loopback.
#
#   launch/dev/hosts.sh up DIR N     make N hosts; print one line per host and the bridge:
#                                      host NAME ADDRESS LINK     (LINK: its cable, on this side)
#                                      bridge NAME ADDRESS        (this machine, reachable from every host)
#   launch/dev/hosts.sh down DIR     remove what `up` recorded in DIR, and nothing else
#
# Run a command on a host with `ip netns exec NAME CMD...`. Inside, the host has loopback and
# eth0 (ADDRESS/24); every host's name and the bridge's resolve there (/etc/netns/NAME/hosts).
# The machine's own host name (`hostname`) is the same on every host and resolves on none of them,
# like cluster nodes whose host names point at a management network: the training interface must
# be chosen (cluster.network_interface), not taken from the host name. `ip link set LINK down`
# cuts a host off; `up` puts it back.
#
# Hosts are named hXnK (K = 1..N) on 10.77.X.0/24 with the bridge at 10.77.X.254, where X is the
# first index no other copy uses, so several copies can run side by side. Needs root and
# Debian's iproute2.
set -euo pipefail

usage() { echo "usage: $0 up DIR N | down DIR" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
state=$dir/hosts
LOCK=/run/train-harness-hosts.lock

up() {
    local n=$1
    [[ $n =~ ^[1-9][0-9]?$ && $n -le 200 ]] || { echo "hosts.sh: N must be 1 to 200, not '$n'" >&2; exit 2; }
    command -v ip >/dev/null || { echo "hosts.sh: ip not found; install Debian's iproute2" >&2; exit 1; }
    [[ $(id -u) -eq 0 ]] || { echo "hosts.sh: must run as root (network namespaces)" >&2; exit 1; }
    if [[ -s $state ]]; then echo "hosts.sh: already up in $dir ($(wc -l <"$state") hosts)" >&2; exit 1; fi
    exec 9>"$LOCK"
    flock 9  # two copies must not pick the same index
    local x
    for x in $(seq 0 250); do
        ip link show "hbr$x" >/dev/null 2>&1 || ip -o -4 addr show | grep -q " 10\.77\.$x\." || break
    done
    [[ $x -lt 250 ]] || { echo "hosts.sh: no free 10.77.X.0/24 subnet" >&2; exit 1; }
    local bridge=hbr$x net=10.77.$x
    trap 'echo "hosts.sh: failed; removing what was made" >&2; down' ERR
    ip link add "$bridge" type bridge
    echo "bridge $bridge $net.254" >"$state"
    ip addr add "$net.254/24" dev "$bridge"
    ip link set "$bridge" up

    local names=() k name link
    for k in $(seq "$n"); do names+=("h${x}n$k"); done
    for k in $(seq "$n"); do
        name=h${x}n$k link=hv${x}x$k
        ip netns add "$name"
        echo "host $name $net.$k $link" >>"$state"
        mkdir -p "/etc/netns/$name"
        {
            echo "127.0.0.1 localhost"
            for j in $(seq "$n"); do echo "$net.$j ${names[$((j - 1))]}"; done
            echo "$net.254 $bridge"
        } >"/etc/netns/$name/hosts"
        : >"/etc/netns/$name/resolv.conf"  # no DNS: a name not in hosts fails at once
        ip link add "$link" type veth peer name "eth0" netns "$name"
        ip link set "$link" master "$bridge"
        ip link set "$link" up
        ip -n "$name" addr add "$net.$k/24" dev eth0
        ip -n "$name" link set lo up
        ip -n "$name" link set eth0 up
        ip -n "$name" route add default via "$net.254"
    done
    trap - ERR
    flock -u 9
    grep '^host ' "$state"
    grep '^bridge ' "$state"
}

down() {
    [[ -s $state ]] || return 0
    local kind name address link
    while read -r kind name address link; do
        if [[ $kind == host ]]; then
            ip netns del "$name" 2>/dev/null || true  # takes eth0 and its peer with it
            ip link del "$link" 2>/dev/null || true
            rm -rf "/etc/netns/$name"
        fi
    done <"$state"
    while read -r kind name address link; do
        [[ $kind == bridge ]] && { ip link del "$name" 2>/dev/null || true; }
    done <"$state"
    : >"$state"
}

case $action in
    up) [[ $# -eq 3 ]] || usage; up "$3" ;;
    down) [[ $# -eq 2 ]] || usage; down ;;
    *) usage ;;
esac

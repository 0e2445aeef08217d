#!/usr/bin/env bash
# A throw-away single-node Ceph with its S3 gateway on this machine: one mon, one memstore OSD, RGW.
#
#   launch/dev/ceph.sh up DIR        start it (config, state, logs under DIR), create an S3 user
#                                    with generated keys, print the endpoint and the env file
#   launch/dev/ceph.sh down DIR      stop the daemons it started (only the pids recorded in DIR)
#   launch/dev/ceph.sh stop-rgw DIR  kill RGW only (fault injection: the S3 endpoint goes away)
#   launch/dev/ceph.sh start-rgw DIR start RGW again on the same port; wait until it answers
#
# `up` prints two lines:
#   endpoint: http://127.0.0.1:PORT
#   env: DIR/s3.env        (mode 0600: `. DIR/s3.env` exports AWS_ACCESS_KEY_ID,
#                           AWS_SECRET_ACCESS_KEY and S3_ENDPOINT_URL; keys are never printed)
#
# Needs root and Debian's packages: apt-get install ceph-mon ceph-osd radosgw ceph-common.
# Ports: CEPH_DEV_RGW_PORT (S3) and CEPH_DEV_MON_PORT (the mon, msgr v2); each defaults to a free
# port, so several copies can run side by side. Data lives in RAM (memstore): `down` loses it.
# RGW listens on CEPH_DEV_RGW_ADDR (default 127.0.0.1; the mon always on 127.0.0.1): 0.0.0.0 makes
# S3 reachable on every address of this machine too, e.g. from the test hosts of launch/dev/hosts.sh
# at their bridge's address (the printed endpoint stays http://127.0.0.1:PORT, for this machine).
# See shared/notes/ceph.md for why each setting is there.
set -euo pipefail

usage() { echo "usage: $0 up|down|stop-rgw|start-rgw DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
run=$dir/run
conf=$dir/ceph.conf
export CEPH_CONF=$conf
PY=${PYTHON:-python3}

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_for SECONDS WHAT CMD...: poll CMD every 0.1 s until it succeeds.
wait_for() {
    local limit=$1 what=$2; shift 2
    local tries=$((limit * 10))
    for _ in $(seq "$tries"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "ceph.sh: $what not ready after ${limit} s; last log lines:" >&2
    tail -n 20 "$dir"/log/*.log >&2 2>/dev/null || true
    return 1
}

# start NAME CMD...: run a daemon in the foreground mode, in the background, pid in run/NAME.pid.
start() {
    local name=$1; shift
    nohup "$@" -f >>"$dir/log/$name.out" 2>&1 </dev/null &
    echo $! >"$run/$name.pid"
}

rgw_port() { sed -n 's/.*beast endpoint=[0-9.]*:\([0-9]*\).*/\1/p' "$conf"; }

rgw_answers() {
    "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "http://127.0.0.1:$(rgw_port)/"
}

osd_up() { ceph osd dump 2>/dev/null | grep -q "^osd.0 up"; }

start_rgw() {
    start rgw radosgw -n client.rgw.a
    wait_for 60 "RGW on port $(rgw_port)" rgw_answers
}

stop_pid() {  # stop_pid NAME: TERM, wait up to 3 s (a zombie counts as gone), then KILL
    local file=$run/$1.pid pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 30); do
        [[ $(ps -o stat= -p "$pid" 2>/dev/null) == [^Z]* ]] || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$file"
}

up() {
    for tool in monmaptool ceph-mon ceph-osd radosgw radosgw-admin ceph "$PY"; do
        command -v "$tool" >/dev/null || {
            echo "ceph.sh: $tool not found; install Debian's packages:" \
                 "apt-get install ceph-mon ceph-osd radosgw ceph-common" >&2; exit 1; }
    done
    [[ $(id -u) -eq 0 ]] || { echo "ceph.sh: must run as root" >&2; exit 1; }
    if [[ -s $run/mon.pid ]] && kill -0 "$(cat "$run/mon.pid")" 2>/dev/null; then
        echo "ceph.sh: already up in $dir" >&2; exit 1
    fi
    mkdir -p "$run" "$dir"/{log,mon,osd,rgw}
    local fsid mon_port rgw_port rgw_addr=${CEPH_DEV_RGW_ADDR:-127.0.0.1}
    fsid=$(cat /proc/sys/kernel/random/uuid)
    mon_port=${CEPH_DEV_MON_PORT:-$(free_port)}
    rgw_port=${CEPH_DEV_RGW_PORT:-$(free_port)}
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$mon_port]
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
run dir = $run
admin socket = $run/\$name.asok
log file = $dir/log/\$name.log
mon data = $dir/mon/\$id
osd data = $dir/osd/\$id
osd objectstore = memstore
memstore device bytes = 8G
osd memory target = 1G
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 2
mon data avail crit = 1
mon allow pool delete = true
mgr initial modules =
paxos propose interval = 0.1
[client.rgw.a]
rgw frontends = beast endpoint=$rgw_addr:$rgw_port
rgw data = $dir/rgw
ms mon client mode = crc
rgw gc obj min wait = 10
rgw gc processor period = 10
EOF
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
    ceph-mon --mkfs -i a --monmap "$dir/monmap" >>"$dir/log/mkfs.out" 2>&1
    start mon ceph-mon -i a
    wait_for 30 "mon on port $mon_port" ceph mon stat

    local osd_uuid id
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    id=$(ceph osd new "$osd_uuid" 2>>"$dir/log/mkfs.out")
    [[ $id == 0 ]] || { echo "ceph.sh: expected osd.0, got '$id'" >&2; down; exit 1; }
    mkdir -p "$dir/osd/0"
    ceph-osd -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$dir/log/mkfs.out" 2>&1
    start osd ceph-osd -i 0
    wait_for 60 "osd.0" osd_up || { down; exit 1; }

    start_rgw || { down; exit 1; }

    # Keys are generated by radosgw-admin and go straight into the env file: never on a
    # command line, never on stdout.
    local env=$dir/s3.env
    (umask 077; radosgw-admin user create --uid=dev --display-name=dev 2>>"$dir/log/mkfs.out" |
        "$PY" -c '
import json, shlex, sys
key = json.load(sys.stdin)["keys"][0]
print("export AWS_ACCESS_KEY_ID=" + shlex.quote(key["access_key"]))
print("export AWS_SECRET_ACCESS_KEY=" + shlex.quote(key["secret_key"]))
print("export S3_ENDPOINT_URL=" + shlex.quote(sys.argv[1]))
' "http://127.0.0.1:$rgw_port" >"$env")
    chmod 0600 "$env"
    echo "endpoint: http://127.0.0.1:$rgw_port"
    echo "env: $env"
}

down() {
    local name
    for name in rgw osd mgr mon; do stop_pid "$name"; done
}

case $action in
    up) up ;;
    down) down ;;
    stop-rgw) stop_pid rgw ;;
    start-rgw) start_rgw ;;
    *) usage ;;
esac

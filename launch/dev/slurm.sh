#!/usr/bin/env bash
# A throw-away Slurm on this machine: munged, slurmctld and two nodes, each a slurmd in its own
# test host (launch/dev/hosts.sh: a network namespace with its own address on a bridge), so the
# ranks of a job meet over a network as on a cluster.
#
#   launch/dev/slurm.sh up DIR     start it (state, logs and slurm.conf under DIR; the hosts under
#                                  DIR/hosts), wait until both nodes are idle, print the nodes and
#                                  `export SLURM_CONF=DIR/slurm.conf`
#   launch/dev/slurm.sh down DIR   stop the daemons it started (only the pids recorded in DIR) and
#                                  remove its hosts
#
# The nodes are named after their hosts (hXn1, hXn2). slurmctld runs on this machine and listens
# on the hosts' bridge, which is how the nodes and this machine's sbatch/sinfo reach it.
# Needs root, iproute2 and Debian's packages: apt-get install slurmctld slurmd slurm-client munge.
# Ports: SLURM_DEV_CTLD_PORT (default 6817) and SLURM_DEV_NODE_PORT (the first node; the second
# is the next one; default 17001), so two copies on one machine can run side by side (each makes
# its own hosts). See shared/notes/slurm.md.
set -euo pipefail

usage() { echo "usage: $0 up|down DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
pids=$dir/run/pids
conf=$dir/slurm.conf

# `sh -c "$ON_HOST" HOST CMD...` in a new mount namespace: CMD on the test host HOST, as `ip netns
# exec HOST` runs it (the host's /etc/hosts and resolv.conf) but with this machine's /sys, where
# slurmd finds the cgroup file systems that ip netns exec hides under the namespace's own sysfs.
ON_HOST='for f in hosts resolv.conf; do mount --bind "/etc/netns/$0/$f" "/etc/$f"; done
exec nsenter --net="/run/netns/$0" "$@"'

up() {
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || {
            echo "slurm.sh: $tool not found; install Debian's packages:" \
                 "apt-get install slurmctld slurmd slurm-client munge" >&2; exit 1; }
    done
    [[ $(id -u) -eq 0 ]] || { echo "slurm.sh: must run as root (slurmd, network namespaces)" >&2; exit 1; }
    if [[ -s $pids ]] && kill -0 $(cat "$pids") 2>/dev/null; then
        echo "slurm.sh: already up in $dir (pids $(tr '\n' ' ' <"$pids"))" >&2; exit 1
    fi
    mkdir -p "$dir"/{state,spool,run,log}
    : >"$pids"

    # munged refuses to run as root; Debian's package makes its key and files for user munge.
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        install -d -o munge -g munge -m 0755 /run/munge
        runuser -u munge -- /usr/sbin/munged
        pgrep -u munge -n -x munged >>"$pids"
        for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    fi

    # The nodes: two test hosts. Each resolves the other's name (the rendezvous host) itself.
    local made nodes=() addrs=() bridge kind name address _
    made=$(bash "$(dirname "$0")/hosts.sh" up "$dir/hosts" 2) || {
        echo "slurm.sh: could not make the nodes' hosts (launch/dev/hosts.sh)" >&2; down; exit 1; }
    while read -r kind name address _; do
        case $kind in
            host) nodes+=("$name"); addrs+=("$address") ;;
            bridge) bridge=$address ;;
        esac
    done <<<"$made"

    local ctld_port=${SLURM_DEV_CTLD_PORT:-6817} node_port=${SLURM_DEV_NODE_PORT:-17001}
    cat >"$conf" <<EOF
ClusterName=dev
SlurmctldHost=localhost($bridge)
SlurmctldPort=$ctld_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120 s), because the
# nodes still refuse the revoked credential of its previous attempt until then.
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
MinJobAge=5
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
NodeName=${nodes[0]} NodeAddr=${addrs[0]} Port=$node_port CPUs=2 RealMemory=2048 State=UNKNOWN
NodeName=${nodes[1]} NodeAddr=${addrs[1]} Port=$((node_port + 1)) CPUs=2 RealMemory=2048 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$conf
    nohup slurmctld -D -i -f "$conf" >>"$dir/log/slurmctld.out" 2>&1 &
    echo $! >>"$pids"
    for node in "${nodes[@]}"; do
        nohup unshare --mount sh -c "$ON_HOST" "$node" slurmd -D -N "$node" -f "$conf" \
            >>"$dir/log/slurmd-$node.out" 2>&1 &
        echo $! >>"$pids"
    done

    # `idle*` means not registered yet: wait for exactly `idle` on both nodes.
    for _ in $(seq 300); do
        if [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | sort | tr '\n' ' ') == "${nodes[0]} idle ${nodes[1]} idle " ]]; then
            echo "nodes: ${nodes[0]} (${addrs[0]}), ${nodes[1]} (${addrs[1]}); slurmctld at $bridge:$ctld_port"
            echo "export SLURM_CONF=$conf"
            return 0
        fi
        sleep 0.1
    done
    echo "slurm.sh: nodes not idle after 30 s: $(sinfo -h -N -o '%N %t' 2>&1 | tr '\n' ' ')" >&2
    tail -n 20 "$dir"/log/*.log >&2 || true
    down
    exit 1
}

down() {
    if [[ -s $pids ]]; then
        local pid
        while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$pids"
        # Killed daemons may linger as zombies of an init that does not reap: wait for the state.
        for _ in $(seq 50); do
            local alive=0
            while read -r pid; do
                [[ $(ps -o stat= -p "$pid" 2>/dev/null) == [^Z]* ]] && alive=1
            done <"$pids"
            [[ $alive -eq 0 ]] && break
            sleep 0.1
        done
        : >"$pids"
    fi
    bash "$(dirname "$0")/hosts.sh" down "$dir/hosts"
}

case $action in
    up) up ;;
    down) down ;;
    *) usage ;;
esac

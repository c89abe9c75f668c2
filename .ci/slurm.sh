#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the tests and CI (submitit jobs, job arrays).
#
# Run as root. Idempotent: installs what is missing (slurm-wlm, munge and, for accounting, slurmdbd and
# mariadb-server), writes /etc/slurm/slurm.conf (and slurmdbd.conf), starts whichever daemons are not
# running (directly, no systemd needed) and waits until the node is idle. When everything is already up
# it only checks, in about a second.
#
#   QGMIL_SLURM_ACCOUNTING=1  (default, unless this script last set up a cluster without accounting, whose
#                             mode a rerun keeps) slurmdbd + MariaDB, so that `sacct` works. submitit learns the
#                             state of a job only from sacct: without it, a job that ends without writing
#                             its result (scancel, time limit, OOM kill) leaves job.result() waiting forever.
#   QGMIL_SLURM_ACCOUNTING=0  no accounting at all (AccountingStorageType=accounting_storage/none).
#   QGMIL_SLURM_FORCE=1       overwrite a slurm.conf that this script did not write (off by default,
#                             so that a real cluster's configuration is never replaced).
#   QGMIL_SLURM_TIMEOUT=60    seconds to wait for the node to become idle.
set -euo pipefail

TIMEOUT=${QGMIL_SLURM_TIMEOUT:-60}
MARKER="# Written by qgmil .ci/slurm.sh"
CONF=/etc/slurm/slurm.conf
if [ -n "${QGMIL_SLURM_ACCOUNTING:-}" ]; then
    ACCOUNTING=$QGMIL_SLURM_ACCOUNTING
elif [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF" &&
    grep -qx 'AccountingStorageType=accounting_storage/none' "$CONF"; then
    ACCOUNTING=0  # keep the mode of the running cluster (a rerun, e.g. by the pytest fixture, changes nothing)
else
    ACCOUNTING=1
fi
DBD_CONF=/etc/slurm/slurmdbd.conf
LOGDIR=/var/log/slurm
RUNDIR=/run/slurm
T0=$(date +%s.%N)

log() { echo "slurm.sh: $*"; }
die() {
    echo "slurm.sh: ERROR: $*" >&2
    exit 1
}
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
# The tail of a log file, for error messages.
tail_of() {
    if [ -f "$1" ]; then { echo "--- last lines of $1:"; tail -n "${2:-15}" "$1"; } >&2; fi
}
# The pid in pid file $1, if that process is alive and is $2 (not a later process that reuses the pid).
alive_pid() {
    local pid
    pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && echo "$pid"
}
stop_pidfile() {  # stop the daemon of one pid file (only that pid), waiting up to 15 s
    local pid
    pid=$(alive_pid "$1" "$2") || return 0
    log "stopping $2 (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    die "$2 (pid $pid) did not stop"
}
# Start a command detached from this script: own session, no inherited stdio (a caller that captures our
# output, like the pytest fixture, must not wait for the daemons), output to a log file.
spawn() {
    local logfile=$1
    shift
    setsid "$@" </dev/null >>"$logfile" 2>&1 &
}
wait_until() {  # wait_until SECONDS COMMAND...: until COMMAND succeeds; fails after SECONDS
    local secs=$1
    shift
    local end=$(($(date +%s) + secs))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || return 1
        sleep 0.2
    done
}

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts the SLURM daemons)"
[ "$ACCOUNTING" = 0 ] || [ "$ACCOUNTING" = 1 ] || die "QGMIL_SLURM_ACCOUNTING must be 0 or 1, not '$ACCOUNTING'"

# --- packages ---------------------------------------------------------------------------------------
missing=()
for cmd in slurmctld slurmd sbatch munged; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
if [ "$ACCOUNTING" = 1 ]; then
    for cmd in slurmdbd mariadbd; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
fi
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them (Debian/Ubuntu only)"
    pkgs=(slurm-wlm munge)
    [ "$ACCOUNTING" = 0 ] || pkgs+=(slurmdbd mariadb-server)
    log "installing ${pkgs[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' maintainer scripts from starting services (no systemd in a container; and the
    # daemons are started below, with this configuration), unless the machine already has such a policy.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt_log=$(mktemp /tmp/qgmil-slurm-apt.XXXXXX)
    apt-get update -qq >"$apt_log" 2>&1 || { tail_of "$apt_log" 30; die "apt-get update failed (log: $apt_log)"; }
    apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "${pkgs[@]}" \
        >>"$apt_log" 2>&1 || { tail_of "$apt_log" 30; die "apt-get install ${pkgs[*]} failed (log: $apt_log)"; }
    [ -z "$policy" ] || { rm -f "$policy"; trap - EXIT; }
    for cmd in "${missing[@]}"; do command -v "$cmd" >/dev/null || die "$cmd still missing after apt-get install"; done
    log "installed in $(elapsed) s"
fi

HOST=$(hostname -s)
[ -n "$HOST" ] || die "hostname -s is empty"
install -d -m 0755 /etc/slurm "$LOGDIR" "$RUNDIR" /var/spool/slurmctld /var/spool/slurmd

# --- munge ------------------------------------------------------------------------------------------
id munge >/dev/null 2>&1 || die "no 'munge' user (is the munge package installed?)"
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    if [ -n "$(alive_pid /run/munge/munged.pid munged || true)" ]; then
        die "munged is running but 'munge -n | unmunge' fails (another key? see /var/log/munge/munged.log)"
    fi
    log "starting munged"
    if ! runuser -u munge -- munged --force </dev/null >>/var/log/munge/munged.stdout 2>&1; then
        tail_of /var/log/munge/munged.stdout
        tail_of /var/log/munge/munged.log
        die "munged did not start"
    fi
    wait_until 15 munge_ok || { tail_of /var/log/munge/munged.log; die "munge -n | unmunge fails"; }
fi

# --- configuration ----------------------------------------------------------------------------------
# Write $2 to $1 if it differs; refuse to replace a file this script did not write. Returns 0 if changed.
write_conf() {
    local path=$1 text=$2 mode=$3
    if [ -f "$path" ] && [ "$(cat "$path")" = "$text" ]; then return 1; fi
    if [ -f "$path" ] && ! grep -qF "$MARKER" "$path" && [ "${QGMIL_SLURM_FORCE:-0}" != 1 ]; then
        die "$path exists and was not written by this script; set QGMIL_SLURM_FORCE=1 to replace it"
    fi
    log "writing $path"
    printf '%s\n' "$text" >"$path.tmp"
    chmod "$mode" "$path.tmp"
    mv "$path.tmp" "$path"
    return 0
}

CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
REAL_MB=$((MEM_MB * 9 / 10))  # a bit under the machine's, so that slurmd never finds less than configured
if [ "$ACCOUNTING" = 1 ]; then
    ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
else
    ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi
SLURM_CONF="$MARKER: a single-node cluster for tests and CI. Rerun the script after editing it.
ClusterName=qgmil-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
# No cgroups: plain /proc process tracking, no task binding (works in containers, without systemd).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$ACCT_LINES
# Several 1-CPU tasks at once: CPUs (not whole cores) and memory are the consumable resources. A job that
# asks for no memory gets DefMemPerCPU, not the whole node.
SchedulerType=sched/backfill
# Schedule a submitted batch job at once (the default waits up to 3 s after the last scheduling pass).
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
# Trust this file over what slurmd detects (containers report odd topologies); a node that was DOWN
# comes back as soon as its slurmd registers.
SlurmdParameters=config_overrides
ReturnToService=2
# Short timeouts: finished jobs leave squeue after 2 s, killed ones get 2 s between SIGTERM and SIGKILL.
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
MinJobAge=2
# Arrays of up to 10000 tasks (benchmark grids); the default stops at 1000.
MaxArraySize=10001
KillWait=2
Waittime=0
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUNDIR/slurmctld.pid
SlurmdPidFile=$RUNDIR/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$CPUS RealMemory=$REAL_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP"

conf_changed=0
write_conf "$CONF" "$SLURM_CONF" 0644 && conf_changed=1

# --- accounting: MariaDB + slurmdbd -----------------------------------------------------------------
if [ "$ACCOUNTING" = 1 ]; then
    # MariaDB on its unix socket only; slurmdbd connects as root through it (unix_socket authentication,
    # so there is no password anywhere).
    MYCNF=/etc/mysql/mariadb.conf.d/99-qgmil-slurm.cnf
    install -d -m 0755 /etc/mysql/mariadb.conf.d
    write_conf "$MYCNF" "$MARKER: MariaDB for slurmdbd only.
[mysqld]
skip-networking
innodb_buffer_pool_size=64M
innodb_lock_wait_timeout=900" 0644 || true
    db_ok() { mariadb -u root -e 'SELECT 1' >/dev/null 2>&1; }
    if ! db_ok; then
        install -d -o mysql -g mysql -m 0755 /run/mysqld
        if [ ! -d /var/lib/mysql/mysql ]; then
            log "initialising the MariaDB data directory"
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/var/log/slurm/mariadb-install.log 2>&1 ||
                { tail_of /var/log/slurm/mariadb-install.log; die "mariadb-install-db failed"; }
        fi
        log "starting mariadbd"
        spawn "$LOGDIR/mariadbd.log" mariadbd --user=mysql
        wait_until 30 db_ok || { tail_of "$LOGDIR/mariadbd.log"; die "MariaDB did not start"; }
    fi

    DBD_TEXT="$MARKER: slurmdbd for the single-node test cluster.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
LogFile=$LOGDIR/slurmdbd.log
PidFile=$RUNDIR/slurmdbd.pid"
    if write_conf "$DBD_CONF" "$DBD_TEXT" 0600; then stop_pidfile "$RUNDIR/slurmdbd.pid" slurmdbd; fi
    if [ -z "$(alive_pid "$RUNDIR/slurmdbd.pid" slurmdbd || true)" ]; then
        log "starting slurmdbd"
        spawn "$LOGDIR/slurmdbd.stdout" slurmdbd
        wait_until 60 sacctmgr -n -P list cluster ||
            { tail_of "$LOGDIR/slurmdbd.log"; die "slurmdbd did not answer (sacctmgr list cluster)"; }
    fi
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx qgmil-ci; then
        log "registering cluster qgmil-ci with slurmdbd"
        sacctmgr -i add cluster qgmil-ci >/dev/null || die "sacctmgr add cluster qgmil-ci failed"
    fi
fi

# --- slurmctld and slurmd ---------------------------------------------------------------------------
if [ "$conf_changed" = 1 ]; then  # a new node or accounting definition needs fresh daemons
    stop_pidfile "$RUNDIR/slurmd.pid" slurmd
    stop_pidfile "$RUNDIR/slurmctld.pid" slurmctld
fi
if [ -z "$(alive_pid "$RUNDIR/slurmctld.pid" slurmctld || true)" ]; then
    log "starting slurmctld"
    spawn "$LOGDIR/slurmctld.stdout" slurmctld
fi
wait_until 30 scontrol ping ||
    { tail_of "$LOGDIR/slurmctld.log"; tail_of "$LOGDIR/slurmctld.stdout"; die "slurmctld does not answer"; }
if [ -z "$(alive_pid "$RUNDIR/slurmd.pid" slurmd || true)" ]; then
    log "starting slurmd"
    spawn "$LOGDIR/slurmd.stdout" slurmd -N "$HOST"
fi

# --- wait for the node --------------------------------------------------------------------------------
end=$(($(date +%s) + TIMEOUT))
resumed=0
while :; do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle | mixed | allocated | completing) break ;;  # up (jobs may be running on it)
        down | drain | drained | draining | fail | inval | *drain*)
            if [ "$resumed" = 0 ]; then
                log "node $HOST is $state: resuming it ($(scontrol show node "$HOST" | grep -o 'Reason=.*' || true))"
                scontrol update nodename="$HOST" state=resume || true
                resumed=1
            fi
            ;;
    esac
    if [ "$(date +%s)" -ge "$end" ]; then
        sinfo -N -l >&2 || true
        scontrol show node "$HOST" >&2 || true
        tail_of "$LOGDIR/slurmctld.log"
        tail_of "$LOGDIR/slurmd.log"
        tail_of "$LOGDIR/slurmd.stdout"
        die "node $HOST is '${state:-unknown}', not idle, after ${TIMEOUT} s"
    fi
    sleep 0.2
done

log "cluster qgmil-ci up in $(elapsed) s: node $HOST ($CPUS CPUs, ${REAL_MB} MB) is $state, accounting=$ACCOUNTING"
sinfo

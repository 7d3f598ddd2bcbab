#!/bin/busybox sh
# /init of blockbackupd's test guest (busybox sh). The workloads, parameters
# and console markers are documented in tools/linux_guest/__init__.py.
#
# As PID 1 it is the supervisor: mounts, modules, disks, the agent, then it
# runs the workload as a child (this same script with BB_ROLE=workload, in a
# session of its own so that it can be stopped as a group) and waits for a
# shutdown request: SIGUSR1 from the power-button watcher, from /sbin/shutdown
# (the agent's guest-shutdown), from the bb.runfor timer or from a workload
# with bb.exit=poweroff.

# busybox runs its own applet before anything on PATH (e.g. its mke2fs): the
# e2fsprogs programs in /usr/local/sbin are called by their full path.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umask 022

say() { echo "$*"; }
err() { echo "BB-ERROR $*"; }
uptime_s() { read -r up _ < /proc/uptime; echo "$up"; }
# Monotonic nanoseconds (/proc/uptime has 10 ms steps, busybox date no %N).
now_ns() { head -3 /proc/timer_list | sed -n 's/^now at \([0-9]*\) nsecs/\1/p'; }

# param NAME DEFAULT: the value of bb.NAME on the kernel command line.
param() { eval "v=\${P_$1-}"; if [ -n "$v" ]; then echo "$v"; else echo "$2"; fi; }

# A comma-separated parameter, as words.
words() { param "$1" "$2" | tr ',' ' '; }

in_list() { case " $2 " in *" $1 "*) return 0;; esac; return 1; }

# dev_of ID: the kernel name (vda, sdb) of the disk the host called ID.
dev_of() { cat "/run/bb/dev/$1" 2>/dev/null; }

# The data disks that are mounted, in bb.disks order.
mounted_disks() {
    for id in $(words disks ""); do
        [ -e "/run/bb/mnt/$id" ] && echo "$id"
    done
}

# nth N WORD...: the Nth word, or nothing.
nth() {
    i=$1
    shift
    for x in "$@"; do
        i=$((i - 1))
        [ $i -eq 0 ] && echo "$x" && return
    done
}

stopping() { [ -e /run/bb/stop ]; }

# ------------------------------------------------------------------ workloads

wl_idle() {
    while ! stopping; do sleep 1; done
}

wl_probe() {
    kill -USR1 1
}

# One half of a crash step on disk $1, step $2: a file of random bytes, fsync,
# then its line in the log, fsync. The file of step $2 - keep goes first.
crash_half() {
    if [ "$keep" -gt 0 ] && [ "$2" -gt "$keep" ]; then
        rm -f "/mnt/$1/f$(($2 - keep))"
    fi
    f=/mnt/$1/f$2
    kib=$((kmin + RANDOM % (kmax - kmin + 1)))
    if ! dd if=/dev/urandom of="$f" bs=${kib}k count=1 iflag=fullblock conv=fsync \
            2>/run/bb/dd.err; then
        err "crash disk=$1 step=$2 write f$2: $(tr '\n' ' ' < /run/bb/dd.err)"
        return 1
    fi
    sum=$(sha256sum "$f") || { err "crash disk=$1 step=$2 read f$2"; return 1; }
    if ! echo "f$2 ${sum%% *}" | dd of="/mnt/$1/log" oflag=append conv=notrunc,fsync \
            2>/run/bb/dd.err; then
        err "crash disk=$1 step=$2 log: $(tr '\n' ' ' < /run/bb/dd.err)"
        return 1
    fi
}

entries() { if [ -e "$1" ]; then grep -c '^f' "$1"; else echo 0; fi; }

wl_crash() {
    m=$(mounted_disks)
    a=$(param a "$(nth 1 $m)")
    b=$(param b "$(nth 2 $m)")
    if [ -z "$a" ] || [ -z "$b" ] || [ "$a" = "$b" ]; then
        err "crash: needs two mounted disks (bb.a, bb.b)"
        return 1
    fi
    kmin=$(param kmin 64) kmax=$(param kmax 1024)
    delay=$(param delay 0) steps=$(param steps 0) every=$(param every 1)
    if [ -e "/mnt/$a/log" ]; then   # a later boot of the same disks: go on
        keep=$(sed -n '1s/^# crash keep=//p' "/mnt/$a/log")
    else
        # Old files are deleted to stay within 60% of the smaller disk's space.
        free=$(df -k "/mnt/$a" "/mnt/$b" | awk 'NR > 1 { print $4 }' | sort -n | head -1)
        keep=$(param keep $((free * 6 / 10 / kmax)))
        [ "$keep" -gt 0 ] && [ "$keep" -lt 2 ] && keep=2
        for d in "$a" "$b"; do
            echo "# crash keep=$keep" | dd of="/mnt/$d/log" conv=fsync 2>/dev/null
        done
    fi
    na=$(entries "/mnt/$a/log") nb=$(entries "/mnt/$b/log")
    say "BB-CRASH a=$a b=$b keep=$keep resume=$na"
    n=$na
    if [ "$nb" -lt "$na" ]; then   # a crash between the halves: finish that step
        crash_half "$b" "$n" || return 1
    fi
    while ! stopping; do
        n=$((n + 1))
        crash_half "$a" "$n" || return 1
        crash_half "$b" "$n" || return 1
        [ $((n % every)) -eq 0 ] && say "BB-STEP $n"
        if [ "$steps" -gt 0 ] && [ "$n" -ge $((na + steps)) ]; then
            break
        fi
        [ "$delay" != 0 ] && sleep "$delay"
    done
    say "BB-STEP $n"
}

wl_write() {
    id=$(param disk "$(nth 1 $(words disks ""))")
    dev=$(dev_of "$id")
    [ -n "$dev" ] || { err "write: no disk $id"; return 1; }
    mib=$(param mib 64) bs=$(param bs 1024) mode=$(param mode direct)
    lat=$(param lat 256) rounds=$(param rounds 1)
    if [ -e "/run/bb/mnt/$id" ]; then
        target=/mnt/$id/bench.dat kind=file
    else
        target=/dev/$dev kind=raw
    fi
    case "$mode" in
        direct) flags="oflag=direct conv=notrunc,fsync" ;;
        fsync) flags="conv=notrunc,fsync" ;;
        *) err "write: bb.mode=$mode (direct or fsync)"; return 1 ;;
    esac
    r=1
    while [ "$r" -le "$rounds" ] && ! stopping; do
        t0=$(now_ns)
        # shellcheck disable=SC2086
        if ! dd if=/dev/zero of="$target" bs=${bs}k count=$((mib * 1024 / bs)) $flags \
                2>/run/bb/dd.err; then
            err "write disk=$id: $(tr '\n' ' ' < /run/bb/dd.err)"
            return 1
        fi
        t1=$(now_ns)
        line="disk=$id target=$kind mode=$mode round=$r mib=$mib bs_kib=$bs"
        line="$line $(awk -v a="$t0" -v b="$t1" -v m="$mib" \
            'BEGIN { s = (b - a) / 1e9; printf "secs=%.3f write_mibs=%.1f", s, m / s }')"
        if [ "$lat" -gt 0 ]; then
            # Small synchronous writes: each 4 KiB O_DIRECT write waits for the device.
            t0=$(now_ns)
            if ! dd if=/dev/zero of="$target" bs=4k count="$lat" oflag=direct conv=notrunc \
                    2>/run/bb/dd.err; then
                err "write disk=$id latency: $(tr '\n' ' ' < /run/bb/dd.err)"
                return 1
            fi
            t1=$(now_ns)
            line="$line lat_writes=$lat $(awk -v a="$t0" -v b="$t1" -v n="$lat" \
                'BEGIN { printf "lat_ms=%.3f", (b - a) / 1e6 / n }')"
        fi
        say "BB-RESULT write $line"
        r=$((r + 1))
    done
}

wl_script() {
    src=/sys/firmware/qemu_fw_cfg/by_name/opt/bb/script/raw
    if [ ! -r "$src" ]; then
        err "script: no $src (-fw_cfg name=opt/bb/script,file=...)"
        return 1
    fi
    cp "$src" /run/bb/script
    # Sourced: the script can use say, err, param, dev_of, mounted_disks, stopping.
    . /run/bb/script
}

run_workload() {
    w=$(param workload idle)
    case "$w" in
        idle|probe|crash|write|script) ;;
        *) err "unknown workload bb.workload=$w"; return 1 ;;
    esac
    "wl_$w"
    rc=$?
    say "BB-DONE $w rc=$rc"
    if [ "$(param exit idle)" = poweroff ]; then
        kill -USR1 1
    fi
    return $rc
}

if [ "$BB_ROLE" = workload ]; then
    run_workload
    exit $?
fi

# ----------------------------------------------------------------- supervisor

/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run/bb/dev /run/bb/mnt /run/qga
hostname bbguest
say "BB-INIT uptime=$(uptime_s) kernel=$(uname -r)"

for w in $(cat /proc/cmdline); do
    case "$w" in
        bb.*=*)
            k=${w%%=*} k=${k#bb.} v=${w#*=}
            case "$k" in
                ""|*[!a-z0-9_]*) err "bad parameter $w" ;;
                *) export "P_$k=$v" ;;
            esac ;;
    esac
done

# From here on, a shutdown request (SIGUSR1) is remembered until the main loop.
STOP=
trap 'STOP=1' USR1 TERM INT

while read -r m; do
    insmod "/lib/modules/$m.ko" || err "insmod $m"
done < /lib/modules/load

# disk_id DEV: the serial the host gave the device (its QEMU id), else DEV.
disk_id() {
    s=
    if [ -r "/sys/block/$1/serial" ]; then          # virtio-blk
        s=$(cat "/sys/block/$1/serial")
    elif [ -r "/sys/block/$1/device/vpd_pg80" ]; then  # SCSI: unit serial number page
        s=$(tail -c +5 "/sys/block/$1/device/vpd_pg80" | tr -d '\000 ')
    fi
    echo "${s:-$1}"
}

wanted=$(words disks "")
deadline=$(( $(cut -d. -f1 /proc/uptime) + $(param disk_timeout 30) ))
while :; do
    missing=
    for d in /sys/block/vd* /sys/block/sd*; do
        [ -e "$d" ] || continue
        dev=${d##*/}
        echo "$dev" > "/run/bb/dev/$(disk_id "$dev")"
    done
    for id in $wanted; do
        [ -e "/run/bb/dev/$id" ] || missing="$missing $id"
    done
    [ -z "$missing" ] && break
    if [ "$(cut -d. -f1 /proc/uptime)" -ge "$deadline" ]; then
        err "disks not found:$missing (have: $(ls /sys/block | tr '\n' ' '))"
        break
    fi
    sleep 0.1
done
if [ -z "$wanted" ]; then   # none named: every disk found, by kernel name
    wanted=$(ls /run/bb/dev | tr '\n' ' ')
    export P_disks=$(echo $wanted | tr ' ' ',')
fi

raw=$(words raw "")
format=$(param format auto)
mountopts=$(param mountopts "")
for id in $wanted; do
    dev=$(dev_of "$id")
    [ -n "$dev" ] || continue
    if in_list "$id" "$raw"; then
        say "BB-DISK id=$id dev=/dev/$dev raw"
        continue
    fi
    made=0
    if [ "$format" = always ] || { [ "$format" = auto ] && ! /usr/local/sbin/dumpe2fs -h "/dev/$dev" >/dev/null 2>&1; }; then
        if /usr/local/sbin/mke2fs -q -F -t ext4 -L "$id" -E lazy_itable_init=0,lazy_journal_init=0,nodiscard \
                "/dev/$dev" > /run/bb/mkfs.out 2>&1; then
            made=1
        else
            err "mkfs disk=$id dev=/dev/$dev: $(tr '\n' ' ' < /run/bb/mkfs.out)"
            continue
        fi
    fi
    mkdir -p "/mnt/$id"
    if mount -t ext4 ${mountopts:+-o "$mountopts"} "/dev/$dev" "/mnt/$id"; then
        : > "/run/bb/mnt/$id"
        say "BB-DISK id=$id dev=/dev/$dev mnt=/mnt/$id formatted=$made"
    else
        err "mount disk=$id dev=/dev/$dev"
    fi
done

QGA=
if [ "$(param agent 0)" = 1 ]; then
    port=
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
    done
    if [ -z "$port" ]; then
        err "agent: no virtio-serial port named org.qemu.guest_agent.0"
    else
        qemu-ga -m virtio-serial -p "$port" -t /run/qga &
        QGA=$!
        i=0   # serving once it holds the port open
        until ls -l "/proc/$QGA/fd" 2>/dev/null | grep -q "$port"; do
            i=$((i + 1))
            if [ $i -gt 100 ] || [ ! -d "/proc/$QGA" ]; then
                err "agent: qemu-ga did not open $port"
                break
            fi
            sleep 0.1
        done
        say "BB-AGENT port=$port pid=$QGA"
    fi
fi

# The ACPI power button (QMP system_powerdown) asks for a clean shutdown.
for d in /sys/class/input/input*; do
    if [ "$(cat "$d/name" 2>/dev/null)" = "Power Button" ]; then
        for e in "$d"/event*; do
            [ -e "$e" ] || continue
            (dd if="/dev/input/${e##*/}" of=/dev/null bs=24 count=1 2>/dev/null
             kill -USR1 1) &
        done
    fi
done
runfor=$(param runfor 0)
if [ "$runfor" != 0 ]; then
    (sleep "$runfor"; kill -USR1 1) &
fi

say "BB-READY uptime=$(uptime_s) workload=$(param workload idle) disks=$(mounted_disks | paste -sd,)"
BB_ROLE=workload setsid /init &
WL=$!

while [ -z "$STOP" ]; do
    sleep 3600 &
    SLEEPER=$!
    wait $SLEEPER
    kill $SLEEPER 2>/dev/null
done

# --------------------------------------------------------------- clean stop

state() { [ -e "/proc/$1/stat" ] && sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1; }
alive() { s=$(state "$1"); [ -n "$s" ] && [ "$s" != Z ]; }

say "BB-SHUTDOWN uptime=$(uptime_s)"
: > /run/bb/stop
for id in $(mounted_disks); do   # a frozen filesystem would hang sync and umount
    fsfreeze --unfreeze "/mnt/$id" 2>/dev/null
done
i=0   # let the workload finish its step
while alive "$WL" && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
kill -TERM -"$WL" 2>/dev/null && sleep 0.2
kill -KILL -"$WL" 2>/dev/null
[ -n "$QGA" ] && kill "$QGA" 2>/dev/null
sync
for id in $(mounted_disks); do
    umount "/mnt/$id" || err "umount disk=$id"
done
say "BB-POWEROFF uptime=$(uptime_s)"
poweroff -f

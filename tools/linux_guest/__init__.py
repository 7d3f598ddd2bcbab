"""A tiny real Linux guest for tests, benchmarks and the demo, from Debian packages.

``python -m tools.linux_guest`` (``make guest``) builds it, or finds it in the
cache, and prints the paths. Modules:

* ``build``: Debian's kernel + an initramfs (busybox-static, e2fsprogs,
  qemu-guest-agent, the kernel modules needed), cached by content in
  ``$BB_GUEST_CACHE`` (default /var/cache/blockbackupd-guest);
* ``accel``: KVM if it boots the guest here, else TCG (probed once, cached;
  ``BB_GUEST_ACCEL=kvm|tcg`` overrides);
* ``vm``: ``LinuxVm``, tools/vm.py's Vm booting this guest, with a blocking
  guest agent client;
* ``fsread``: reading its ext4 disks (or restored backups of them) without
  mounting them, and checking the crash workload's invariant;
* ``init.sh``: the guest's /init.

Boot (every workload)
---------------------
/init mounts proc, sys and devtmpfs, loads the modules, waits for the disks
named in ``bb.disks`` (LinuxVm passes its disk ids; each device has
``serial=<id>``, read back from /sys/block/vdX/serial for virtio-blk and from
the SCSI unit serial number page, /sys/block/sdX/device/vpd_pg80, for
scsi-hd), makes an ext4 filesystem on each one that has none (``mke2fs -F``,
inode tables and journal written at once, no discard), mounts it at
``/mnt/<id>``, starts qemu-ga on the virtio-serial port named
``org.qemu.guest_agent.0`` (``bb.agent=1``; state in /run/qga), prints
``BB-READY`` and runs the workload. In the guest, e2fsprogs' programs are in
/usr/local/sbin (busybox runs its own applets first: call them by full path).

Workloads (``bb.workload=``)
----------------------------
``idle`` (default)
    Nothing: tests freeze it through the agent, write to it with guest-exec...
``crash``
    On disks A and B (``bb.a``, ``bb.b``; default the first two mounted), step
    n = 1, 2, ...: write ``f<n>`` (random bytes, ``bb.kmin``..``bb.kmax`` KiB,
    default 64..1024) on A, fsync it, append ``f<n> <sha256>`` to A's ``log``,
    fsync it; then the same on B. So at any single instant B's log has as many
    complete lines as A's, or one fewer. ``BB-STEP <n>`` every ``bb.every``
    steps (default 1). ``bb.delay`` seconds between steps (default 0),
    ``bb.steps`` steps then stop (default 0: until shutdown). The logs start
    with ``# crash keep=K``: the file of step n - K is deleted before step n is
    written, so that the disks do not fill (K: 60% of the smaller disk's free
    space over kmax, or ``bb.keep``; 0 keeps all). A later boot on the same
    disks goes on from the logs (finishing B's half of an interrupted step).
    ``fsread.check_crash_logs`` checks all this on images.
``write``
    Throughput: ``dd`` of ``bb.mib`` MiB (default 64) in ``bb.bs`` KiB blocks
    (default 1024) of zeros to disk ``bb.disk`` (default the first), to the
    raw device if that disk is listed in ``bb.raw`` (which leaves it unformatted
    and unmounted) or else to /mnt/<id>/bench.dat; ``bb.mode=direct`` (default:
    O_DIRECT, then fsync) or ``fsync`` (page cache, then fsync). Then latency:
    ``bb.lat`` (default 256, 0 to skip) 4 KiB O_DIRECT writes, each waiting for
    the device. ``bb.rounds`` repeats (default 1). Per round one line:
    ``BB-RESULT write disk=vda target=file|raw mode=direct round=1 mib=64
    bs_kib=1024 secs=0.508 write_mibs=252.1 lat_writes=256 lat_ms=0.281``
    (times from the guest's monotonic clock).
``script``
    Runs the shell script the host passes as fw_cfg file ``opt/bb/script``
    (``LinuxVm(script=...)``), sourced by busybox sh after BB-READY, so it can
    use ``say``, ``err``, ``param NAME DEFAULT``, ``dev_of ID``,
    ``mounted_disks`` and ``stopping``.
``probe``
    Powers off right after BB-READY (the accelerator probe).

Other parameters: ``bb.disks=vda,sdb`` (ids to wait for; LinuxVm sets it),
``bb.disk_timeout`` (seconds, default 30), ``bb.raw=<ids>``,
``bb.format=auto|always|never`` (default auto: only disks without an ext2/3/4
superblock), ``bb.mountopts=`` (mount -o), ``bb.agent=0|1``,
``bb.exit=idle|poweroff`` (after the workload ends; default idle),
``bb.runfor=SECONDS`` (then a clean shutdown). Values cannot contain spaces.

Console markers (serial console, ttyS0)
---------------------------------------
``BB-INIT uptime=S kernel=V``; ``BB-DISK id=vda dev=/dev/vda mnt=/mnt/vda
formatted=0|1`` (or ``... raw``); ``BB-AGENT port=/dev/vportNpM pid=P``;
``BB-READY uptime=S workload=W disks=a,b``; ``BB-CRASH a= b= keep= resume=``;
``BB-STEP n``; ``BB-RESULT <kind> key=value...``; ``BB-DONE <workload> rc=N``;
``BB-SHUTDOWN``; ``BB-POWEROFF``; ``BB-ERROR <what>`` for every failure the
guest sees (a failed write, mkfs, mount, module, a missing disk...). The
kernel logs to the same console at loglevel 5 (LinuxVm's default), so its
``I/O error`` and ``EXT4-fs error`` lines show there too.

Shutdown
--------
A clean stop is: the workload stops after its current step (given 10 s, then
killed), mounted filesystems are thawed if frozen, synced and unmounted
(``BB-ERROR umount ...`` if one is busy), ``BB-POWEROFF``, ``poweroff -f``;
QEMU (``-no-reboot``) exits. It is asked for by any of: QMP
``system_powerdown`` (the guest watches its ACPI power button), the agent's
``guest-shutdown`` (qemu-ga runs /sbin/shutdown, which signals init),
``bb.runfor=SECONDS``, or ``bb.exit=poweroff`` when the workload ends.
``LinuxVm.shutdown(via="acpi"|"agent")`` does it and waits for QEMU's exit;
``LinuxVm.stop()`` (QMP quit) and ``kill()`` are unclean for the guest.
"""

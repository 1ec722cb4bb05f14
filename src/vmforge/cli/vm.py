"""``vmforge run``, ``vmforge host`` and ``vmforge vm ...``: boot images in QEMU and manage the
VMs (lifecycle, snapshots, clones, live migration, balloon)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..model import human_size
from .common import Lazy, Sub, add_output, command, print_json

if TYPE_CHECKING:
    from ..model.hardware import VirtualHardware
    from ..runtime import clones as vmclones
    from ..runtime import cloudinit
    from ..runtime import console as vmconsole
    from ..runtime import errors as rterrors
    from ..runtime import host as vmhost
    from ..runtime import machine as rtmachine
    from ..runtime import migrate as vmmigrate
    from ..runtime import snapshots as vmsnap
    from ..runtime import state as vmstate
    from ..runtime import vm as vmrun
    from ..runtime.cloudinit import Seed
else:  # the QEMU runtime (asyncio, qemu.qmp) is loaded only by the commands that use it
    vmclones, cloudinit, rterrors, vmhost, rtmachine, vmmigrate, vmsnap, vmstate, vmrun = (
        Lazy(f"vmforge.runtime.{m}") for m in ("clones", "cloudinit", "errors", "host",
                                               "machine", "migrate", "snapshots", "state", "vm"))
if TYPE_CHECKING:
    from ..runtime import appliance as vmappliance
else:
    vmappliance = Lazy("vmforge.runtime.appliance")
    vmconsole = Lazy("vmforge.runtime.console")

#: a sanity bound for --count (each VM is a QEMU process with its own memory)
MAX_COUNT = 64


def register(sub: Sub) -> None:
    p = command(sub, "run", "boot an image in QEMU on a private overlay (the image is never written)",
                "  vmforge run --detach disk.qcow2                       boot it, return when up\n"
                "  vmforge run --name web --cpus 2 --memory 1G disk.qcow2\n"
                "  vmforge run --kernel vmlinuz --initrd initrd.img --append console=ttyS0 root.raw\n"
                "  vmforge run --untrusted -f qcow2 --detach downloaded.qcow2\n"
                "  vmforge run --detach appliance.ova     the hardware its OVF declares; flags win\n")
    p.add_argument("image", help="a disk image, or an OVA appliance (imported into the VM)")
    p.add_argument("-f", dest="fmt", help="the image's format (probed when omitted; 'ova' for "
                                          "an appliance)")
    p.add_argument("--name", help="VM name (default: from the image file name)")
    p.add_argument("--cpus", type=str, default=None,
                   help="virtual CPUs (default 1, or what an OVA declares)")
    p.add_argument("--memory", type=str, default=None,
                   help="memory, e.g. 512M, 2G (default 512M, or what an OVA declares)")
    p.add_argument("--kernel", help="boot this kernel directly (no boot loader)")
    p.add_argument("--initrd", help="initial ramdisk for --kernel")
    p.add_argument("--append", help="kernel command line for --kernel")
    p.add_argument("--net", default=None, metavar="NET",
                   help="network: user (NAT, the default), none, or segment:NAME (an isolated "
                        "segment shared with the other VMs on it); on an OVA, every NIC's")
    p.add_argument("--forward", action="append", default=[], metavar="HOST:GUEST",
                   help="forward TCP port HOST on 127.0.0.1 to GUEST in the VM (--net user; "
                        "repeatable)")
    p.add_argument("--machine", default=None, choices=("q35", "pc"),
                   help="machine type (default q35, or what an OVA declares)")
    p.add_argument("--disk-bus", choices=("virtio", "sata", "ide", "scsi"),
                   help="OVA: attach every hard disk on this bus instead of the declared one")
    p.add_argument("--configuration",
                   help="OVA: the OVF deployment option to boot (default: its default)")
    p.add_argument("--accel", default=None, choices=("auto", "kvm", "tcg"),
                   help="accelerator (default auto: KVM if a probe boots under it, else TCG)")
    p.add_argument("--marker", action="append", metavar="TEXT",
                   help="serial output that means the guest is up (repeatable; default "
                        "VMFORGE-GUEST-UP or a login prompt)")
    p.add_argument("--timeout", type=float, default=180.0,
                   help="seconds to wait for the marker (default 180)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for the guest")
    p.add_argument("--detach", "-d", action="store_true",
                   help="leave the VM running in the background once it is up")
    p.add_argument("--untrusted", action="store_true",
                   help="the image may not refer to any other file; QEMU gets no backing for it")
    p.add_argument("--cloud-init", metavar="FILE",
                   help="cloud-init user-data for a NoCloud seed ISO (label cidata) attached "
                        "read-only")
    p.add_argument("--ssh-key", action="append", default=[], metavar="KEY|FILE",
                   help="an SSH public key (or .pub file) for the seed's public-keys "
                        "(repeatable)")
    p.add_argument("--hostname", help="the guest's hostname (seed meta-data local-hostname)")
    p.add_argument("--count", type=int, default=1, metavar="N",
                   help="start N linked clones of the image, named NAME-1..NAME-N (implies "
                        "--detach)")
    add_output(p)
    p.set_defaults(func=cmd_run)

    p = command(sub, "host", "what this host can give VMs and what running VMs hold",
                "  vmforge host\n  VMFORGE_MEMORY_OVERCOMMIT=1.5 vmforge host --output json\n")
    add_output(p)
    p.set_defaults(func=cmd_host)

    p = command(sub, "vm", "manage VMs started by 'vmforge run'",
                "  vmforge vm list\n  vmforge vm show web\n  vmforge vm logs web\n"
                "  vmforge vm stop web        ACPI power-down, then quit, then kill\n"
                "  vmforge vm kill web\n  vmforge vm rm web\n"
                "  vmforge vm pause web       freeze the guest's CPUs\n"
                "  vmforge vm resume web\n"
                "  vmforge vm console web     the serial console; Ctrl-] leaves\n"
                "  echo uname -a | vmforge vm console web --timeout 5    from a script\n"
                "  vmforge vm snapshot web before-upgrade      RAM, devices and disks\n"
                "  vmforge vm restore web before-upgrade\n"
                "  vmforge vm clone web web2 --start\n"
                "  vmforge vm migrate web --to tcp:127.0.0.1:4444\n"
                "  vmforge vm set web --memory 384M            through the balloon\n")
    vsub = p.add_subparsers(dest="vm_command", metavar="ACTION", parser_class=type(p))
    vsub.required = True
    q = vsub.add_parser("list", help="list VMs and whether they run")
    add_output(q)
    q.set_defaults(func=cmd_list)
    q = vsub.add_parser("show", help="one VM in detail")
    q.add_argument("name")
    add_output(q)
    q.set_defaults(func=cmd_show)
    q = vsub.add_parser("stop", help="stop gracefully: ACPI power-down, then quit, then kill")
    q.add_argument("name")
    q.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the guest to power off (default 30)")
    q.set_defaults(func=cmd_stop)
    q = vsub.add_parser("kill", help="stop at once (SIGKILL)")
    q.add_argument("name")
    q.set_defaults(func=cmd_kill)
    q = vsub.add_parser("pause", help="freeze a running VM's CPUs (QMP stop)")
    q.add_argument("name")
    q.set_defaults(func=cmd_pause)
    q = vsub.add_parser("resume", help="let a paused VM run on (QMP cont)")
    q.add_argument("name")
    q.set_defaults(func=cmd_resume)
    q = vsub.add_parser("console", help="attach to the serial console (Ctrl-] detaches)")
    q.add_argument("name")
    q.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="detach after S seconds (for scripts; default: until Ctrl-], the "
                        "VM stops or, without a terminal, Ctrl-C)")
    q.set_defaults(func=cmd_console)
    q = vsub.add_parser("logs", help="print the serial console log")
    q.add_argument("name")
    q.add_argument("-n", "--tail", type=int, default=None, metavar="N", help="only the last N lines")
    q.set_defaults(func=cmd_logs)
    q = vsub.add_parser("start", help="start a stopped VM (or a clone) again on its overlay")
    q.add_argument("name")
    q.add_argument("--accel", default=None, choices=("auto", "kvm", "tcg"))
    q.add_argument("--timeout", type=float, default=180.0,
                   help="seconds to wait for the guest (default 180)")
    q.add_argument("--no-wait", action="store_true", help="do not wait for the guest")
    add_output(q)
    q.set_defaults(func=cmd_start)
    q = vsub.add_parser("snapshot", help="snapshot a VM: RAM, devices and disks, or --disk-only")
    q.add_argument("name")
    q.add_argument("tag")
    q.add_argument("--disk-only", action="store_true",
                   help="only the disks (the guest keeps running; works on a stopped VM too)")
    q.add_argument("--delete", action="store_true", help="delete the snapshot TAG instead")
    add_output(q)
    q.set_defaults(func=cmd_snapshot)
    q = vsub.add_parser("restore", help="go back to a snapshot (a running guest resumes there)")
    q.add_argument("name")
    q.add_argument("tag")
    add_output(q)
    q.set_defaults(func=cmd_restore)
    q = vsub.add_parser("snapshots", help="list a VM's snapshots")
    q.add_argument("name")
    add_output(q)
    q.set_defaults(func=cmd_snapshots)
    q = vsub.add_parser("clone", help="a new VM sharing this VM's base (with its changes if "
                                      "it is stopped)")
    q.add_argument("name")
    q.add_argument("new")
    q.add_argument("--start", action="store_true", help="start the clone once made")
    add_output(q)
    q.set_defaults(func=cmd_clone)
    q = vsub.add_parser("migrate", help="live-migrate a running VM into a new QEMU on this host")
    q.add_argument("name")
    q.add_argument("--to", required=True, metavar="URI",
                   help="where the destination QEMU listens: tcp:127.0.0.1:PORT")
    q.add_argument("--timeout", type=float, default=300.0,
                   help="seconds the migration may take (default 300)")
    add_output(q)
    q.set_defaults(func=cmd_migrate)
    q = vsub.add_parser("set", help="change a running VM: --memory through the balloon")
    q.add_argument("name")
    q.add_argument("--memory", required=True, help="the memory the guest may use, e.g. 384M "
                                                   "(at most what it was started with)")
    add_output(q)
    q.set_defaults(func=cmd_set)
    q = vsub.add_parser("rm", help="delete a stopped VM (its overlay and logs)")
    q.add_argument("name")
    q.add_argument("--force", action="store_true", help="kill it first if it runs")
    q.set_defaults(func=cmd_rm)


def _network(net: str) -> str:
    """``--net`` as a NIC's network: ``user``, ``none`` or a segment name."""
    if net in ("user", "none"):
        return net
    if net.startswith("segment:") and net[len("segment:"):] not in ("user", "none"):
        return net[len("segment:"):]
    raise UsageError(f"unknown network {net!r}", hint="use user, none or segment:NAME")


def _hardware(args: argparse.Namespace) -> VirtualHardware:
    from ..model.hardware import Nic, VirtualHardware, parse_cpus, parse_memory

    net = _network(args.net or "user")
    nics: tuple[Nic, ...] = () if net == "none" else \
        (Nic(network=net, forwards=tuple(args.forward) if net == "user" else ()),)
    if args.forward and net != "user":
        raise UsageError("--forward needs --net user")
    # 'is None', not 'or': an empty --cpus= / --memory= is a mistake, not the default
    return VirtualHardware(cpus=parse_cpus("1" if args.cpus is None else args.cpus),
                           memory=parse_memory("512M" if args.memory is None else args.memory),
                           nics=nics,
                           machine=args.machine or "q35", kernel=args.kernel, initrd=args.initrd,
                           append=args.append).validate()


def _seed(args: argparse.Namespace) -> Seed | None:
    if not (args.cloud_init or args.ssh_key or args.hostname):
        return None
    user_data = cloudinit.read_user_data(args.cloud_init) if args.cloud_init else b"#cloud-config\n"
    hostname = cloudinit.check_hostname(args.hostname) if args.hostname else None
    return cloudinit.Seed("pending", user_data, hostname,
                          tuple(cloudinit.ssh_key(k) for k in args.ssh_key))


def _run_appliance(args: argparse.Namespace, markers: tuple[str, ...]) -> vmrun.Started:
    """``run`` on an OVA: the declared hardware, with the flags given on top."""
    from ..model.hardware import Bus, parse_cpus, parse_memory

    if args.count != 1:
        raise UsageError("--count does not apply to an OVA",
                         hint="import it first ('vmforge import'), then run its disk with --count")
    overrides = vmappliance.Overrides(
        cpus=parse_cpus(args.cpus) if args.cpus is not None else None,
        memory=parse_memory(args.memory) if args.memory is not None else None,
        machine=args.machine,
        disk_bus=Bus(args.disk_bus) if args.disk_bus else None,
        network=_network(args.net) if args.net else None, forwards=tuple(args.forward),
        kernel=args.kernel, initrd=args.initrd, append=args.append)
    return vmappliance.start_appliance(
        args.image, overrides, name=args.name, configuration=args.configuration,
        accel=args.accel, markers=markers, wait=not args.no_wait, timeout=args.timeout,
        seed=_seed(args))


def cmd_run(args: argparse.Namespace) -> int:
    from ..packages.ova import looks_like_ova

    markers = tuple(args.marker) if args.marker else vmrun.DEFAULT_MARKERS
    # an OVA is recognised by its first member (the .ovf); -f names any other format
    if args.fmt == "ova" or (args.fmt is None and looks_like_ova(args.image)):
        started = _run_appliance(args, markers)
    else:
        if args.disk_bus or args.configuration:
            raise UsageError("--disk-bus and --configuration apply to an OVA appliance",
                             hint="a disk image is attached as a virtio disk")
        hw = _hardware(args)
        seed = _seed(args)
        if args.count != 1:
            return _run_many(args, hw, markers, seed)
        started = vmrun.start(args.image, hw, name=args.name, image_format=args.fmt,
                              untrusted=args.untrusted, accel=args.accel, markers=markers,
                              wait=not args.no_wait, timeout=args.timeout, seed=seed)
    info: dict[str, Any] = {"name": started.name, "accel": started.accel.name,
                            "accel_reason": started.accel.reason,
                            "qmp_ready_seconds": round(started.qmp_seconds, 3),
                            "marker": started.marker,
                            "guest_up_seconds": (round(started.guest_seconds, 3)
                                                 if started.guest_seconds is not None else None),
                            "state_dir": str(started.state.dir)}
    if args.output == "json":
        print_json(info)
    else:
        print(f"VM {started.name} started; QMP ready in {started.qmp_seconds:.2f} s")
        print(f"accelerator: {started.accel.name.upper()} ({started.accel.reason})")
        if started.guest_seconds is not None:
            print(f"guest up after {started.guest_seconds:.1f} s (saw {started.marker!r})")
    sys.stdout.flush()
    if args.detach:
        if args.output != "json":
            print(f"running in the background: 'vmforge vm logs {started.name}', "
                  f"'vmforge vm stop {started.name}'")
        return 0
    return _follow(started.state)


def _follow(st: vmstate.VmState) -> int:
    """Copy the serial log to stdout until the VM stops; Ctrl-C stops the VM."""
    pos = 0
    try:
        while True:
            try:
                with open(st.serial_path, "rb") as log:
                    log.seek(pos)
                    chunk = log.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                pos += len(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            if not st.running():
                st.clean_runtime_files()
                print(f"VM {st.name} has stopped", file=sys.stderr)
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        how = rtmachine.Machine(st).stop()
        print(f"VM {st.name} stopped ({how})", file=sys.stderr)
        return 130


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for st in vmstate.all_vms():
        try:
            rows.append(vmrun.describe_vm(st))
        except rterrors.MachineError:
            rows.append({"name": st.name, "status": "incomplete", "pid": None})
    if args.output == "json":
        print_json(rows)
        return 0
    if not rows:
        print("no VMs")
        return 0
    print(f"{'NAME':<20} {'STATUS':<10} {'PID':>8} {'CPUS':>4} {'MEMORY':>8} {'ACCEL':<5} BASE")
    for r in rows:
        mem = human_size(r["memory"]) if r.get("memory") else "-"
        print(f"{r['name']:<20} {r['status']:<10} {r['pid'] or '-':>8} {r.get('cpus') or '-':>4} "
              f"{mem:>8} {r.get('accel') or '-':<5} {r.get('base') or '-'}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    data = vmrun.describe_vm(vmstate.vm(args.name))
    if args.output == "json":
        print_json(data)
        return 0
    for key, value in data.items():
        if key == "disks":
            for i, d in enumerate(value):
                used = human_size(d["bytes_on_disk"]) if d["bytes_on_disk"] is not None else "?"
                print(f"{'disk' + str(i) + ':':<14}{d['path']} ({d['format']}, {used} on disk)")
        elif key == "memory" and value:
            print(f"{'memory:':<14}{human_size(value)}")
        elif value is not None:
            print(f"{key + ':':<14}{value}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    how = vmrun.stop(args.name, timeout=args.timeout)
    print(f"VM {args.name}: {'was not running' if how == 'not running' else 'stopped by ' + how}")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    killed = vmrun.kill(args.name)
    print(f"VM {args.name}: {'killed' if killed else 'was not running'}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    changed = vmconsole.pause(vmstate.vm(args.name))
    print(f"VM {args.name}: {'paused' if changed else 'was already paused'}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    changed = vmconsole.resume(vmstate.vm(args.name))
    print(f"VM {args.name}: {'resumed' if changed else 'was not paused'}")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout:g} is not a positive number of seconds")
    st = vmstate.vm(args.name)
    vmconsole.require_running(st)
    try:
        stdin_fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        raise UsageError("vm console needs a standard input to read from") from None
    interactive = os.isatty(stdin_fd)
    out = getattr(sys.stdout, "buffer", None)

    def output(data: bytes) -> None:
        if out is not None:
            out.write(data)
        else:
            sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()

    def connected() -> None:
        how = ("Ctrl-] detaches" if interactive else
               f"stdin is sent to the guest; ends after {args.timeout:g} s, when the VM stops "
               "or on Ctrl-C" if args.timeout else
               "stdin is sent to the guest; ends when the VM stops or on Ctrl-C")
        # a raw terminal needs CR LF to start a new line
        end = "\r\n" if interactive else "\n"
        print(f"connected to the serial console of VM {st.name} ({how})", end=end,
              file=sys.stderr, flush=True)

    try:
        with (vmconsole.raw_terminal(stdin_fd) if interactive else contextlib.nullcontext()):
            why = vmconsole.attach(st, stdin_fd, output, interactive=interactive,
                                   timeout=args.timeout, on_connected=connected)
    except KeyboardInterrupt:
        print(f"\ndetached from VM {st.name}", file=sys.stderr)
        return 130
    ends = {"detached": f"detached from VM {st.name} (it keeps running)",
            "stopped": f"the console of VM {st.name} closed (the VM stopped or moved)",
            "timeout": f"detached from VM {st.name} after {args.timeout or 0:g} s"}
    print(("\n" if interactive else "") + ends[why], file=sys.stderr)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    st = vmstate.vm(args.name)
    try:
        text = st.serial_path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        text = ""
    if args.tail is not None:
        text = "".join(text.splitlines(keepends=True)[-args.tail:] if args.tail > 0 else [])
    sys.stdout.write(text)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    vmrun.remove(args.name, force=args.force)
    print(f"VM {args.name} removed")
    return 0


def _started_info(started: vmrun.Started) -> dict[str, Any]:
    return {"name": started.name, "accel": started.accel.name,
            "accel_reason": started.accel.reason,
            "qmp_ready_seconds": round(started.qmp_seconds, 3), "marker": started.marker,
            "guest_up_seconds": (round(started.guest_seconds, 3)
                                 if started.guest_seconds is not None else None),
            "state_dir": str(started.state.dir)}


def _run_many(args: argparse.Namespace, hw: VirtualHardware, markers: tuple[str, ...],
              seed: Seed | None) -> int:
    if not 1 <= args.count <= MAX_COUNT:
        raise UsageError(f"--count {args.count} is out of range", hint=f"use 1 to {MAX_COUNT}")
    started = vmclones.run_many(args.image, hw, args.count, name=args.name,
                                image_format=args.fmt, untrusted=args.untrusted,
                                accel=args.accel, markers=markers, wait=not args.no_wait,
                                timeout=args.timeout, seed=seed)
    rows = [dict(_started_info(s), overlay_bytes=vmclones.overlay_bytes(s.state),
                 bytes_on_disk=vmclones.disk_used(s.state)) for s in started]
    if args.output == "json":
        print_json(rows)
        return 0
    print(f"{len(rows)} VMs started from {args.image} "
          f"(accelerator: {started[0].accel.name.upper()})")
    print(f"{'NAME':<20} {'GUEST UP':>9} {'OVERLAY':>9} {'DISK USED':>10}")
    for r in rows:
        up = f"{r['guest_up_seconds']:.1f} s" if r["guest_up_seconds"] is not None else "-"
        print(f"{r['name']:<20} {up:>9} {human_size(r['overlay_bytes']):>9} "
              f"{human_size(r['bytes_on_disk']):>10}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    started = vmrun.boot(args.name, accel=args.accel, wait=not args.no_wait,
                         timeout=args.timeout)
    if args.output == "json":
        print_json(_started_info(started))
        return 0
    print(f"VM {started.name} started; QMP ready in {started.qmp_seconds:.2f} s")
    print(f"accelerator: {started.accel.name.upper()} ({started.accel.reason})")
    if started.guest_seconds is not None:
        print(f"guest up after {started.guest_seconds:.1f} s (saw {started.marker!r})")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    st = vmstate.vm(args.name)
    if args.delete:
        snap = vmsnap.delete(st, args.tag)
        if args.output == "json":
            print_json(snap.to_dict())
        else:
            print(f"VM {args.name}: snapshot {snap.name!r} deleted")
        return 0
    snap, seconds = vmsnap.save(st, args.tag, disk_only=args.disk_only)
    if args.output == "json":
        print_json(dict(snap.to_dict(), seconds=round(seconds, 3)))
    else:
        kind = f"full state, {human_size(snap.vm_state_size)} of RAM and devices" \
            if snap.full_state else "disks only"
        print(f"VM {args.name}: snapshot {snap.name!r} saved in {seconds:.2f} s ({kind})")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    snap, what, seconds = vmsnap.restore(vmstate.vm(args.name), args.tag)
    if args.output == "json":
        print_json(dict(snap.to_dict(), restored=what, seconds=round(seconds, 3)))
    else:
        print(f"VM {args.name}: restored {what} from snapshot {snap.name!r} in {seconds:.2f} s")
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    snaps = vmsnap.list_snapshots(vmstate.vm(args.name))
    if args.output == "json":
        print_json([s.to_dict() for s in snaps])
        return 0
    if not snaps:
        print(f"VM {args.name} has no snapshots")
        return 0
    print(f"{'ID':<4} {'NAME':<20} {'KIND':<10} {'VM STATE':>9} {'DATE':<19} VM CLOCK")
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        clock = s.vm_clock_nsec / 1e9
        print(f"{s.id:<4} {s.name:<20} {'full' if s.full_state else 'disk-only':<10} "
              f"{human_size(s.vm_state_size):>9} {date:<19} {clock:.3f} s")
    return 0


def cmd_clone(args: argparse.Namespace) -> int:
    cloned = vmclones.clone(args.name, args.new)
    info: dict[str, Any] = {"name": cloned.name, "source": cloned.source,
                            "copied_overlay": cloned.copied_overlay,
                            "bytes_on_disk": cloned.bytes_on_disk}
    started = vmrun.boot(cloned.name) if args.start else None
    if started is not None:
        info["started"] = _started_info(started)
    if args.output == "json":
        print_json(info)
        return 0
    what = "with its changes" if cloned.copied_overlay else "from its base (it is running)"
    print(f"VM {cloned.name} cloned from {cloned.source} {what}; "
          f"{human_size(cloned.bytes_on_disk)} on disk")
    if started is not None and started.guest_seconds is not None:
        print(f"VM {cloned.name} started; guest up after {started.guest_seconds:.1f} s")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    done = vmmigrate.migrate(vmstate.vm(args.name), args.to, timeout=args.timeout)
    info = {"name": done.name, "uri": done.uri, "source_pid": done.source_pid,
            "destination_pid": done.destination_pid, "total_ms": done.total_ms,
            "downtime_ms": done.downtime_ms, "setup_ms": done.setup_ms,
            "transferred_bytes": done.transferred_bytes}
    if args.output == "json":
        print_json(info)
        return 0
    sent = f", {human_size(done.transferred_bytes)} sent" if done.transferred_bytes else ""
    print(f"VM {done.name} migrated to {done.uri}: total {done.total_ms} ms, "
          f"downtime {done.downtime_ms} ms{sent}")
    print(f"QEMU pid {done.source_pid} has exited; the VM runs on in pid {done.destination_pid}")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    from ..model.hardware import parse_memory

    target, actual = vmhost.set_memory(vmstate.vm(args.name), parse_memory(args.memory))
    if args.output == "json":
        print_json({"name": args.name, "memory_target": target, "memory_actual": actual})
        return 0
    settled = "" if actual == target else " (the guest has not given it all back yet)"
    print(f"VM {args.name}: memory target {human_size(target)}, the guest has "
          f"{human_size(actual)}{settled}")
    return 0


def cmd_host(args: argparse.Namespace) -> int:
    from ..runtime.accel import choose_accel
    from ..runtime.machine import find_qemu

    h = vmhost.host()
    accel = choose_accel(find_qemu(), None, cache_dir=vmstate.state_root())
    data = dict(h.to_dict(), accel=accel.name, accel_reason=accel.reason)
    if args.output == "json":
        print_json(data)
        return 0
    print(f"CPUs:          {h.cpus} (capacity {h.cpu_capacity} vCPUs at "
          f"{h.policy.cpu_overcommit:g}x; {h.cpus_held} held)")
    print(f"memory:        {human_size(h.memory)} ({human_size(h.available_memory)} available; "
          f"capacity {human_size(h.memory_capacity)} = (total - "
          f"{human_size(h.policy.reserved_memory)} reserved) x {h.policy.memory_overcommit:g}; "
          f"{human_size(h.memory_held)} held)")
    print(f"accelerator:   {accel.name.upper()} ({accel.reason})")
    print(f"policy from:   {h.policy.source}")
    for vm in h.held:
        print(f"  {vm.name:<20} {vm.cpus:>3} vCPUs {human_size(vm.memory):>10}")
    return 0

"""``vmforge run`` and ``vmforge vm list|show|stop|kill|logs|rm``: boot images in QEMU."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..model import human_size
from ..model.hardware import Nic, VirtualHardware, parse_cpus, parse_memory
from ..runtime import state as vmstate
from ..runtime import vm as vmrun
from ..runtime.errors import MachineError
from ..runtime.machine import Machine
from .common import Sub, add_output, command, print_json


def register(sub: Sub) -> None:
    p = command(sub, "run", "boot an image in QEMU on a private overlay (the image is never written)",
                "  vmforge run --detach disk.qcow2                       boot it, return when up\n"
                "  vmforge run --name web --cpus 2 --memory 1G disk.qcow2\n"
                "  vmforge run --kernel vmlinuz --initrd initrd.img --append console=ttyS0 root.raw\n"
                "  vmforge run --untrusted -f qcow2 --detach downloaded.qcow2\n")
    p.add_argument("image")
    p.add_argument("-f", dest="fmt", help="the image's format (probed when omitted)")
    p.add_argument("--name", help="VM name (default: from the image file name)")
    p.add_argument("--cpus", type=str, default="1", help="virtual CPUs (default 1)")
    p.add_argument("--memory", type=str, default="512M", help="memory, e.g. 512M, 2G (default 512M)")
    p.add_argument("--kernel", help="boot this kernel directly (no boot loader)")
    p.add_argument("--initrd", help="initial ramdisk for --kernel")
    p.add_argument("--append", help="kernel command line for --kernel")
    p.add_argument("--net", default="user", choices=("user", "none"),
                   help="network: user-mode NAT (default) or none")
    p.add_argument("--machine", default="q35", choices=("q35", "pc"), help="machine type")
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
    add_output(p)
    p.set_defaults(func=cmd_run)

    p = command(sub, "vm", "manage VMs started by 'vmforge run'",
                "  vmforge vm list\n  vmforge vm show web\n  vmforge vm logs web\n"
                "  vmforge vm stop web        ACPI power-down, then quit, then kill\n"
                "  vmforge vm kill web\n  vmforge vm rm web\n")
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
    q = vsub.add_parser("logs", help="print the serial console log")
    q.add_argument("name")
    q.add_argument("-n", "--tail", type=int, default=None, metavar="N", help="only the last N lines")
    q.set_defaults(func=cmd_logs)
    q = vsub.add_parser("rm", help="delete a stopped VM (its overlay and logs)")
    q.add_argument("name")
    q.add_argument("--force", action="store_true", help="kill it first if it runs")
    q.set_defaults(func=cmd_rm)


def _hardware(args: argparse.Namespace) -> VirtualHardware:
    nics = (Nic(network="user"),) if args.net == "user" else ()
    return VirtualHardware(cpus=parse_cpus(args.cpus), memory=parse_memory(args.memory), nics=nics,
                           machine=args.machine, kernel=args.kernel, initrd=args.initrd,
                           append=args.append).validate()


def cmd_run(args: argparse.Namespace) -> int:
    hw = _hardware(args)
    markers = tuple(args.marker) if args.marker else vmrun.DEFAULT_MARKERS
    started = vmrun.start(args.image, hw, name=args.name, image_format=args.fmt,
                          untrusted=args.untrusted, accel=args.accel, markers=markers,
                          wait=not args.no_wait, timeout=args.timeout)
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
        how = Machine(st).stop()
        print(f"VM {st.name} stopped ({how})", file=sys.stderr)
        return 130


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for st in vmstate.all_vms():
        try:
            rows.append(vmrun.describe_vm(st))
        except MachineError:
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

"""Start-up cost, kept by structure rather than by timing (issue 5).

Every command pays for what ``import vmforge.cli.main`` loads before it runs. These
tests start a fresh interpreter, do one thing (``--version``, parse a command line,
show a command's help, ``info`` an image) and list what got imported: heavy
dependencies and the modules of other commands must not be among them. An eager
import re-added anywhere on those paths (a format package importing its writer, the
export package importing OVA packaging, numpy at module level in the engine) fails
here with the chain of modules that pulled it in.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.data.qemu import qemu_img

#: imported by some commands only; never to start the CLI or parse a command line
HEAVY = re.compile(r"""^(
      numpy | rich | qemu | defusedxml | pycdlib | zstandard | isal | cryptography
    | vmforge\.runtime | vmforge\.packages\.ova | vmforge\.packages\.ovf
    | vmforge\.engine\.copy | vmforge\.ops\.convert | vmforge\.ops\.compare
    | vmforge\.formats\.\w+\.(writer|stream_writer|inplace|sparse_edit|update|amend|repair)
)(\.|$)""", re.X)

#: what ``vmforge --version`` may load of vmforge: the CLI, errors, sizes, the facades
VERSION_ALLOWED = re.compile(r"""^vmforge(
      | \.cli(\.\w+)? | \.errors | \.ops | \.model | \.model\.sizes | \.util | \.util\.lazy
)$""", re.X)

#: a module inside a format package (structs, reader, writer...), not the package itself
FORMAT_MODULE = re.compile(r"^vmforge\.formats\.\w+\.\w+")

#: a writer, an in-place editor or the copy engine: ``info`` reads, it never writes
WRITING = re.compile(r"^vmforge\.(engine\.copy|ops\.(convert|create|edit|output)"
                     r"|formats\.\w+\.(writer|stream_writer|inplace|sparse_edit|update|amend"
                     r"|repair|snapshot))$")

# Runs in a fresh interpreter: each step is (label, kind, argv); after each step it
# records the modules that step imported, and who imported them (a stack of module
# names is kept by wrapping the import machinery's loader calls).
PROBE = r"""
import contextlib, importlib, io, json, sys
import importlib._bootstrap as boot

steps = json.loads(sys.argv[1])
stack, parent = [], {}
real = boot._load_unlocked

def load(spec):
    parent.setdefault(spec.name, stack[-1] if stack else "<command>")
    stack.append(spec.name)
    try:
        return real(spec)
    finally:
        stack.pop()

boot._load_unlocked = load

out = []
for label, kind, argv in steps:
    before = set(sys.modules)
    from vmforge.cli.main import build_parser, main  # loaded by the first step
    buf_out, buf_err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        try:
            if kind == "parse":
                ns = build_parser().parse_args(argv)
                code = 0 if callable(getattr(ns, "func", None)) else "no command function"
            else:
                code = main(argv)
        except SystemExit as exc:
            code = exc.code
    new = sorted(set(sys.modules) - before)
    out.append({"label": label, "code": code, "stdout": buf_out.getvalue(),
                "stderr": buf_err.getvalue(), "new": new})
print(json.dumps({"steps": out, "start": sorted(set(sys.modules)), "parent": parent}))
"""


def probe(steps: list[tuple[str, str, list[str]]]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(steps)],
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def chain(parent: dict[str, str], name: str) -> str:
    """``name <- importer <- ... <- <command>``: why a module was loaded."""
    links = [name]
    while name in parent and len(links) < 30:
        name = parent[name]
        links.append(name)
    return " <- ".join(links)


def offenders(result: dict[str, Any], pattern: re.Pattern[str], *, allow: bool = False,
              steps: int | None = None) -> list[str]:
    """Modules the steps (the first ``steps`` of them) loaded that match ``pattern`` (or,
    with ``allow``, that do not), each with its import chain and the step that loaded it."""
    bad = []
    for step in result["steps"][:steps]:
        for mod in step["new"]:
            hit = pattern.search(mod) is not None
            if hit != allow:
                bad.append(f"{step['label']}: {chain(result['parent'], mod)}")
    return bad


def _subcommand_paths() -> list[list[str]]:
    """Every command and nested subcommand of the CLI (``vm start`` ...), from its parser."""
    import argparse

    from vmforge.cli.main import build_parser

    paths: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    paths.append([*prefix, name])
                    walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return paths


def test_version_loads_only_the_cli():
    result = probe([("--version", "main", ["--version"])])
    step = result["steps"][0]
    assert step["code"] == 0 and step["stdout"].startswith("vmforge "), step
    heavy = offenders(result, HEAVY)
    assert not heavy, "vmforge --version imported:\n" + "\n".join(heavy)
    vm_mods = [m for m in step["new"] if m.startswith("vmforge")]
    assert "vmforge.cli.main" in vm_mods and "vmforge.cli.images" in vm_mods, vm_mods
    extra = [o for o in offenders(result, VERSION_ALLOWED, allow=True)
             if o.split(": ", 1)[1].startswith("vmforge")]
    assert not extra, ("vmforge --version should load only the CLI, errors and sizes; "
                       "import these where they are used:\n" + "\n".join(extra))


def test_every_command_help_and_parse_stays_light():
    """Building the parser and showing every command's help (which lists export targets)
    loads none of the heavy modules; nor does parsing typical command lines."""
    paths = _subcommand_paths()
    assert {"info", "convert", "export", "validate", "run", "import"} <= {p[0] for p in paths}
    steps: list[tuple[str, str, list[str]]] = [
        (" ".join(p) + " --help", "parse", [*p, "--help"]) for p in paths]
    steps += [(" ".join(argv), "parse", argv) for argv in (
        ["info", "--output=json", "disk.qcow2"],
        ["convert", "-p", "-c", "-O", "qcow2", "-o", "compression_type=zstd", "a.raw", "b.qcow2"],
        ["create", "-f", "vmdk", "-o", "subformat=streamOptimized", "a.vmdk", "1G"],
        ["export", "disk.qcow2", "--target", "vmware", "-o", "vm.ova"],
        ["validate", "--target", "aws", "disk.vmdk"],
        ["run", "--memory", "512M", "disk.qcow2"],
    )]
    result = probe(steps)
    for step in result["steps"]:
        assert step["code"] == 0, step
        if step["label"].endswith("--help"):
            assert "usage: vmforge" in step["stdout"], step
    assert "aws" in next(s["stdout"] for s in result["steps"] if s["label"] == "export --help")
    heavy = offenders(result, HEAVY)
    assert not heavy, "parsing or help imported heavy modules:\n" + "\n".join(heavy)


def test_unknown_export_target_is_still_a_usage_error():
    result = probe([("bad target", "main", ["validate", "--target", "nowhere", "x.vmdk"])])
    step = result["steps"][0]
    assert step["code"] == 2, step
    assert "invalid choice: 'nowhere'" in step["stderr"] and "'vmware'" in step["stderr"], step


# the formats qemu-img creates (no reader loads numpy: their tables are array.array;
# qcow2's check still counts refcounts with numpy)
INFO_FORMATS = ["qcow2", "vmdk", "vpc", "vhdx", "vdi", "parallels"]
CHECK_LOADS_NUMPY = {"qcow2"}


@pytest.mark.parametrize("fmt", INFO_FORMATS)
def test_reading_commands_load_a_reader_and_no_writer(tmp_path: Path, fmt: str):
    """info (then map and check) opens one reader; nothing that writes is imported."""
    path = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-q", "-f", fmt, path, "16M")
    result = probe([("info", "main", ["info", str(path)]),
                    ("info json", "main", ["info", "--output=json", str(path)]),
                    ("map", "main", ["map", "--output=json", str(path)]),
                    ("check", "main", ["check", str(path)])])
    human, as_json, mapped, checked = result["steps"]
    assert human["code"] == 0 and f"file format: {fmt}" in human["stdout"], human
    assert as_json["code"] == 0 and json.loads(as_json["stdout"])["format"] == fmt, as_json
    assert mapped["code"] == 0 and json.loads(mapped["stdout"])[0]["start"] == 0, mapped
    assert checked["code"] in (0, 63), checked  # 63: a format without checks, as qemu-img
    package = "vhd" if fmt == "vpc" else fmt
    assert f"vmforge.formats.{package}.reader" in human["new"], human["new"]
    # probing reads the other formats' magics from their packages, never their modules
    others = [o for o in offenders(result, FORMAT_MODULE, steps=1)
              if not o.split(": ", 1)[1].startswith(f"vmforge.formats.{package}.")]
    assert not others, f"info on {fmt} loaded other formats' code:\n" + "\n".join(others)
    writing = offenders(result, WRITING)
    assert not writing, f"reading {fmt} imported writing code:\n" + "\n".join(writing)
    heavy = [o for o in offenders(result, HEAVY) if fmt not in CHECK_LOADS_NUMPY
             or not o.startswith("check: numpy")]
    assert not heavy, f"info on {fmt} imported:\n" + "\n".join(heavy)


def test_info_of_an_overlay_chain_loads_no_writer(tmp_path: Path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "8M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    result = probe([("info chain", "main", ["info", "--backing-chain", str(top)])])
    step = result["steps"][0]
    assert step["code"] == 0 and step["stdout"].splitlines().count("file format: qcow2") == 2, step
    bad = offenders(result, WRITING) + offenders(result, HEAVY)
    assert not bad, "info --backing-chain imported:\n" + "\n".join(bad)


FACADE = r"""
import json, sys, types
import vmforge, vmforge.ops
import vmforge.ops.convert, vmforge.ops.check, vmforge.ops.compare  # the submodules
names = {}
for pkg in ("vmforge", "vmforge.ops", "vmforge.model", "vmforge.formats.qcow2",
            "vmforge.formats.vdi", "vmforge.formats.vhd", "vmforge.formats.vhdx",
            "vmforge.formats.vmdk", "vmforge.formats.parallels"):
    mod = sys.modules.get(pkg) or __import__(pkg, fromlist=["_"])
    for name in mod.__all__:
        value = getattr(mod, name)
        names[f"{pkg}.{name}"] = type(value).__name__
        if isinstance(value, types.ModuleType):
            names[f"{pkg}.{name}"] = "MODULE"
from vmforge import open_image, convert, check, compare, create, measure, CopyStats
print(json.dumps({"names": names, "dir": "open_image" in dir(vmforge),
                  "ops_convert": callable(vmforge.ops.convert)}))
"""


def test_lazy_facades_keep_every_public_name():
    """``from vmforge import convert`` and friends work as before, and a submodule of
    the same name (vmforge.ops.convert) never hides the function once it is imported."""
    proc = subprocess.run([sys.executable, "-c", FACADE], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    modules = [name for name, kind in out["names"].items() if kind == "MODULE"]
    assert not modules, f"these public names are modules, not what they export: {modules}"
    assert out["names"]["vmforge.ops.convert"] == "function"
    assert out["names"]["vmforge.formats.qcow2.Qcow2Reader"] == "ABCMeta"
    assert len(out["names"]) > 40 and out["dir"] and out["ops_convert"], out


def _subcommands(parser: Any) -> dict[str, Any]:
    import argparse

    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_one_command_parser_is_the_full_parsers_command():
    """A command line builds only its command's parser (cli.main.COMMANDS says which
    module registers it): the same help at every level, the same parse, the same errors."""
    from vmforge.cli import main as cli
    from vmforge.errors import UsageError

    full = _subcommands(cli.build_parser())
    assert list(full) == list(cli.COMMANDS), "COMMANDS must list every command, in order"
    for name, module in cli.COMMANDS.items():
        one = _subcommands(cli.build_parser(name))
        assert list(one) == [name]
        pending = [(one[name], full[name], name)]
        while pending:  # the command, then its nested actions (vm list ...)
            mine, theirs, path = pending.pop()
            assert mine.format_help() == theirs.format_help(), path
            func = mine.get_default("func")
            if func is not None:
                assert func.__module__ == f"vmforge.cli.{module}", path
            nested = [a for a in mine._actions if a.choices and hasattr(a, "add_parser")]
            if nested:
                theirs_nested = _subcommands(theirs)
                assert list(nested[0].choices) == list(theirs_nested), path
                pending += [(p, theirs_nested[n], f"{path} {n}")
                            for n, p in nested[0].choices.items()]

    def outcome(argv: list[str], parser: Any) -> Any:
        try:
            return vars(parser.parse_args(argv))
        except UsageError as err:
            return str(err), err.hint

    for argv in (["convert", "-p", "-O", "qcow2", "-o", "cluster_size=4k", "a.raw", "b.qcow2"],
                 ["--debug", "info", "--output=json", "--backing-chain", "x.qcow2"],
                 ["vm", "stop", "--timeout", "3", "web"], ["clone", "--linked", "a", "b"],
                 ["export", "d.raw", "--target", "aws", "-o", "d.vmdk"],
                 ["convert"], ["info", "--bogus", "x"], ["vm"], ["check", "-r", "some", "x"],
                 ["clone", "a", "b"], ["validate", "--target", "nowhere", "x"]):
        assert cli.command_of(argv) == next(a for a in argv if a != "--debug")
        assert outcome(argv, cli.build_parser(cli.command_of(argv))) == \
            outcome(argv, cli.build_parser()), argv
    for argv in (["--help"], ["-h", "info"], [], ["--version"], ["bogus"], ["--deb", "info"]):
        assert cli.command_of(argv) is None, argv  # these need every command's parser


def test_help_and_errors_still_name_every_command():
    result = probe([("help", "main", ["--help"]), ("none", "main", []),
                    ("unknown", "main", ["infos", "x"]),
                    ("command help", "main", ["convert", "--help"])])
    top, none, unknown, convert = result["steps"]
    assert top["code"] == 0 and none["code"] == 2 and unknown["code"] == 2
    from vmforge.cli.main import COMMANDS

    listed = [line.split()[0] for line in top["stdout"].split("COMMAND\n", 1)[1].splitlines()
              if line.startswith("    ") and not line.startswith("     ")]
    assert listed == list(COMMANDS), top["stdout"]
    assert "required: COMMAND" in none["stderr"], none
    assert "invalid choice: 'infos'" in unknown["stderr"] and "'validate'" in unknown["stderr"]
    assert convert["code"] == 0 and "usage: vmforge convert" in convert["stdout"]
    assert "-O OUT_FMT" in convert["stdout"] and "examples:" in convert["stdout"], convert


def test_convert_loads_its_command_and_its_formats_only(tmp_path: Path):
    """raw -> raw loads no numpy and no format's modules (raw is one module); raw ->
    qcow2 adds qcow2's, and never another format's or another command's module."""
    from tests.data.generators import write_pattern
    from vmforge.cli.main import COMMANDS

    src = tmp_path / "src.raw"
    write_pattern(src, "mixed", 2 << 20)
    result = probe([("-O raw", "main", ["convert", "-O", "raw", str(src), str(tmp_path / "o.raw")]),
                    ("-O qcow2", "main", ["convert", "-O", "qcow2", str(src),
                                          str(tmp_path / "o.qcow2")])])
    to_raw, to_qcow2 = result["steps"]
    assert to_raw["code"] == 0 and to_qcow2["code"] == 0, result["steps"]
    for fmt in ("raw", "qcow2"):  # the oracle: what was converted is the source
        qemu_img("compare", "-q", "-f", "raw", "-F", fmt, src, tmp_path / f"o.{fmt}")
    loaded = set(result["start"])
    others = {f"vmforge.cli.{m}" for m in COMMANDS.values()} - {"vmforge.cli.images"}
    assert not others & loaded, sorted(others & loaded)
    assert not offenders(result, FORMAT_MODULE, steps=1), offenders(result, FORMAT_MODULE, steps=1)
    assert not [m for m in to_raw["new"] if m.split(".")[0] == "numpy"], \
        [chain(result["parent"], m) for m in to_raw["new"] if m == "numpy"]
    packages = {m.split(".")[2] for m in loaded if FORMAT_MODULE.match(m)}
    assert packages == {"qcow2"}, offenders(result, FORMAT_MODULE)
    assert "vmforge.formats.qcow2.writer" in to_qcow2["new"]


#: (format, -o options or "-c") of writes that need no numpy: the writers' tables are
#: array.array (util.tables); importing numpy costs a convert 70-100 ms (issue 5)
NUMPY_FREE_WRITES = [
    ("qcow2", ""), ("qcow2", "compat=0.10,cluster_size=4k"), ("qcow2", "refcount_bits=1"),
    ("qcow2", "preallocation=metadata,extended_l2=on"), ("qcow2", "-c"),
    ("vdi", ""), ("vdi", "static=on"), ("vpc", ""), ("vpc", "subformat=fixed"),
    ("vhdx", ""), ("vhdx", "subformat=fixed"), ("vhdx", "block_state_zero=off"),
] + [("vmdk", f"subformat={sub}") for sub in (
    "monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse", "monolithicFlat")] + [
    ("vmdk", "zeroed_grain=on")]


def test_convert_from_raw_never_loads_numpy(tmp_path: Path):
    """Every writer converts a raw source (data, zeros, holes) without importing numpy;
    each output is checked by the oracle so the step really wrote that format."""
    from tests.data.generators import write_pattern

    src = tmp_path / "src.raw"
    write_pattern(src, "mixed", 3 << 20)
    steps, outputs = [], []
    for i, (fmt, options) in enumerate(NUMPY_FREE_WRITES):
        out = tmp_path / str(i) / f"out.{fmt}"
        out.parent.mkdir()
        extra = ["-c"] if options == "-c" else ["-o", options] if options else []
        steps.append((f"-O {fmt} {options}", "main",
                      ["convert", "-O", fmt, *extra, str(src), str(out)]))
        outputs.append((fmt, out))
    result = probe(steps)
    for step, (fmt, out) in zip(result["steps"], outputs, strict=True):
        assert step["code"] == 0, step
        package = "vhd" if fmt == "vpc" else fmt
        assert any(m.startswith(f"vmforge.formats.{package}.") and m.endswith("writer")
                   for m in result["start"]), step["label"]
        qemu_img("compare", "-q", "-f", "raw", "-F", fmt, src, out)
    numpy = offenders(result, re.compile(r"^numpy$"))
    assert not numpy, "a convert from raw imported numpy:\n" + "\n".join(numpy)
    assert "numpy" not in result["start"]


def test_probe_magics_kept_in_the_packages_match_the_structs():
    """The magics that format packages keep for probing equal their structs' own."""
    from vmforge.formats import parallels, qcow2, vdi, vhd, vhdx, vmdk
    from vmforge.formats.parallels import structs as parallels_s
    from vmforge.formats.qcow2 import structs as qcow2_s
    from vmforge.formats.vdi import structs as vdi_s
    from vmforge.formats.vhd import structs as vhd_s
    from vmforge.formats.vhdx import structs as vhdx_s
    from vmforge.formats.vmdk import structs as vmdk_s

    assert qcow2.MAGIC == qcow2_s.MAGIC
    assert (vdi.SIGNATURE, vdi.SIGNATURE_OFFSET) == (vdi_s.SIGNATURE, vdi_s.SIGNATURE_OFFSET)
    assert vhd.COOKIE == vhd_s.COOKIE
    assert vhdx.FILE_SIGNATURE == vhdx_s.FILE_SIGNATURE
    assert vmdk.SPARSE_MAGICS == (vmdk_s.SPARSE_MAGIC, vmdk_s.COWD_MAGIC)
    assert vmdk_s.SESPARSE_MAGIC.to_bytes(8, "little").startswith(vmdk.SESPARSE_PREFIX)
    assert parallels.MAGICS == (parallels_s.MAGIC_V1, parallels_s.MAGIC_V2)


#: (format, qemu-img convert -o options or "-c") of images that vmforge reads without
#: numpy: the readers' tables are array.array (util.tables) and their scans use C-level
#: slice compares; importing numpy costs a convert from such an image 70-100 ms (issue 5)
NUMPY_FREE_READS = [
    ("qcow2", ""), ("qcow2", "-c"), ("qcow2", "compression_type=zstd,cluster_size=4k"),
    ("qcow2", "compat=0.10"), ("qcow2", "extended_l2=on"), ("qcow2", "refcount_bits=1"),
    ("qcow2", "preallocation=metadata"),
    ("vmdk", ""), ("vmdk", "subformat=streamOptimized"), ("vmdk", "zeroed_grain=on"),
    ("vmdk", "subformat=twoGbMaxExtentSparse"), ("vmdk", "subformat=monolithicFlat"),
    ("vmdk", "subformat=twoGbMaxExtentFlat"),
    ("vhdx", ""), ("vhdx", "subformat=fixed"), ("vhdx", "block_size=1M"),
    ("vhdx", "subformat=fixed,block_state_zero=off"), ("vhdx", "block_size=256M,log_size=1M"),
    ("vpc", ""), ("vpc", "subformat=fixed"), ("vpc", "force_size=on"),
    ("vdi", ""), ("vdi", "static=on"),
    ("parallels", ""), ("parallels", "cluster_size=4k"),
]


def test_convert_to_raw_reads_without_numpy(tmp_path: Path):
    """Converting an image qemu-img wrote (data, zeros, holes) to raw, mapping it and
    comparing it with its source import no numpy; each output is compared with the
    source by the oracle."""
    from tests.data.generators import write_pattern

    src = tmp_path / "src.raw"
    write_pattern(src, "mixed", 3 << 20)
    steps, outputs = [], []
    for i, (fmt, options) in enumerate(NUMPY_FREE_READS):
        image = tmp_path / str(i) / f"in.{fmt}"
        image.parent.mkdir()
        extra = ["-c"] if options == "-c" else ["-o", options] if options else []
        qemu_img("convert", "-q", "-f", "raw", "-O", fmt, *extra, src, image)
        out = image.with_name("out.raw")
        steps.append((f"{fmt} {options} -> raw", "main",
                      ["convert", "-f", fmt, "-O", "raw", str(image), str(out)]))
        steps.append((f"map {fmt} {options}", "main", ["map", "--output=json", str(image)]))
        steps.append((f"compare {fmt} {options}", "main",
                      ["compare", "-f", fmt, "-F", "raw", str(image), str(src)]))
        outputs.append(out)
    result = probe(steps)
    for step in result["steps"]:
        assert step["code"] == 0, step
    for out in outputs:
        qemu_img("compare", "-q", "-f", "raw", "-F", "raw", src, out)
    numpy = offenders(result, re.compile(r"^numpy$"))
    assert not numpy, "reading an image imported numpy:\n" + "\n".join(numpy)
    assert "numpy" not in result["start"]

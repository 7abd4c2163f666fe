"""The `quantserve` command line: every command and option explains itself in --help, and an option
that is a Settings field means and checks the same in every command that takes it (its help is the
field's description, its constraint is the field's, refused while parsing with exit status 2)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from quantserve.server.cli import build_parser
from quantserve.server.config import Settings

COMMANDS = ("serve", "env", "quantize", "inspect", "verify", "estimate")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_and_option_has_help():
    parsers = _subparsers()
    assert set(parsers) == set(COMMANDS)
    top = subprocess.run([sys.executable, "-m", "quantserve.server", "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    for name, parser in parsers.items():
        assert name in top
        if name != "env":
            assert parser.description, name
        for action in parser._actions:
            assert action.help, (name, action.dest)
    out = subprocess.run([sys.executable, "-m", "quantserve.server", "estimate", "--help"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert "--max-num-seqs" in out and "does not fit" in " ".join(out.split())


@pytest.mark.parametrize("command", ["serve", "quantize", "inspect", "verify", "estimate"])
def test_settings_options_share_the_fields_help(command):
    options = {a.dest: a for a in _subparsers()[command]._actions if a.dest in Settings.model_fields}
    if command == "verify":
        del options["quant"]  # not the served format but the list of formats to compare (nf4+dq, ...)
    assert options, command
    for name, action in options.items():
        description = (Settings.model_fields[name].description or "").replace("%%", "%")
        assert action.help.replace("%%", "%").startswith(description), (command, name)


@pytest.mark.parametrize("command,argv", [
    ("serve", ["--max-num-seqs", "0"]),
    ("estimate", ["--max-num-seqs", "0"]),
    ("serve", ["--max-model-len", "8"]),  # below Settings' 16
    ("estimate", ["--max-model-len", "ten"]),
    ("estimate", ["--kv-cache-memory", "-1"]),
    ("serve", ["--port", "70000"]),
])
def test_a_setting_out_of_its_range_is_refused_while_parsing(command, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}: '{argv[1]}'" in err, err


def test_settings_values_arrive_typed():
    args = build_parser().parse_args(["estimate", "--max-model-len", "512", "--kv-cache-memory", "0.5"])
    assert (args.max_model_len, args.kv_cache_memory, args.max_num_seqs) == (512, 0.5, 64)
    assert build_parser().parse_args(["estimate", "--max-model-len", "auto"]).max_model_len == "auto"
    verify = build_parser().parse_args(["verify"])
    assert verify.matmul_precision == "highest"  # verify's own default: exact float32 products

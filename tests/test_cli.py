"""The ``kvswitch`` command line after the move of the offline commands out of ``cli.py``: every
command and every option the CLI had before the restructuring is still there, and each command
dispatches to a handler."""

import argparse

import pytest

from serve_app.cli import build_parser

# Recorded from the parser before the restructuring (commit a7edc79): commands and their options.
OPTIONS = {'gen-data': ['--help', '--max-operators', '--min-operators', '--n', '--out', '--seed', '-h'],
 'train-model': ['--forced-close-fraction',
                 '--help',
                 '--hidden-size',
                 '--init-from',
                 '--layers',
                 '--lr',
                 '--min-lr',
                 '--monitor-every',
                 '--out',
                 '--seed',
                 '--slow-fraction',
                 '--steps',
                 '--tokens-per-batch',
                 '--warmup-steps',
                 '-h'],
 'eval': ['--batch-size',
          '--best-of',
          '--coe',
          '--confirm',
          '--dataset',
          '--delta',
          '--every',
          '--help',
          '--kv-quant',
          '--limit',
          '--max-new-tokens',
          '--model',
          '--out',
          '--policy',
          '--probe',
          '--seed',
          '--select',
          '--tau',
          '--temperature',
          '--top-p',
          '-h'],
 'calibrate': ['--batch-size',
               '--confirm',
               '--dataset',
               '--decode-last-tokens',
               '--delta',
               '--every',
               '--features',
               '--heads',
               '--help',
               '--kv-quant',
               '--l2',
               '--last-layers',
               '--last-tokens',
               '--layers',
               '--limit',
               '--max-new-tokens',
               '--model',
               '--out',
               '--part',
               '--report',
               '--split-seed',
               '--tau',
               '--token',
               '-h'],
 'quant-report': ['--batch-size',
                  '--dataset',
                  '--help',
                  '--limit',
                  '--max-new-tokens',
                  '--model',
                  '--out',
                  '--probes',
                  '--settings',
                  '-h'],
 'bench-overhead': ['--batch-sizes',
                    '--help',
                    '--model',
                    '--no-rss',
                    '--out',
                    '--probe',
                    '--repeats',
                    '--threads',
                    '--warmup',
                    '-h'],
 'bench-handoff': ['--help', '--model', '--out', '--prompts', '--repeats', '--threads', '-h'],
 'bench-engines': ['--batch-sizes', '--help', '--model', '--out', '--prompts', '--threads', '-h'],
 'demo': ['--help', '--max-new-tokens', '--model', '--question', '-h'],
 'loadtest': ['--burstiness',
              '--compare',
              '--concurrency',
              '--dataset',
              '--duration',
              '--help',
              '--launch',
              '--max-tokens',
              '--model',
              '--num-requests',
              '--out',
              '--pattern',
              '--rate',
              '--repeats',
              '--scenario',
              '--seed',
              '--shuffle-seed',
              '--slo',
              '--sweep',
              '--temperature',
              '--timeout',
              '--url',
              '--warmup',
              '-h'],
 'chaos': ['--app',
           '--concurrency',
           '--dataset',
           '--help',
           '--kill',
           '--kill-at',
           '--mode',
           '--no-baseline',
           '--no-stream',
           '--num-requests',
           '--out',
           '--ray-address',
           '--seed',
           '--timeout',
           '--url',
           '-h'],
 'fuzz': ['--examples', '--help', '--no-deep', '--out', '--timeout', '--url', '-h']}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_and_option_is_still_there():
    got = {name: sorted(s for act in p._actions for s in act.option_strings) for name, p in _subcommands(build_parser()).items()}
    assert sorted(set(OPTIONS) - set(got)) == []  # no command went missing
    assert sorted(set(got) - set(OPTIONS)) == ["bench-autoscale", "first-pass-errors", "fit-coe", "plot-eval", "set-thresholds"]  # added since (issues 17, 20, 22, 21, 20)
    # options added since (gen-data --operators/--exclude/--drop-excluded) are allowed; none may go missing
    assert {name: sorted(set(OPTIONS[name]) - set(got[name])) for name in OPTIONS} == {name: [] for name in OPTIONS}


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_every_command_dispatches_to_a_handler(command):
    parser = _subcommands(build_parser())[command]
    assert callable(parser.get_default("func")), f"{command} has no handler"


def test_calibrate_decode_pooling_takes_its_own_length_and_part():
    from serve_app.offline.options import calibrate_poolings

    parse = lambda *extra: build_parser().parse_args(["calibrate", "--dataset", "d.jsonl", "--out", "p.pt", *extra])  # noqa: E731
    assert calibrate_poolings(parse()) == (None, None)  # nothing given: the defaults (or the served probe's)
    prompt, decode = calibrate_poolings(parse("--last-tokens", "64", "--part", "k", "--decode-last-tokens", "32", "--decode-part", "kv"))
    assert (prompt.last_tokens, prompt.part) == (64, "k")
    assert (decode.last_tokens, decode.part) == (32, "kv")
    prompt, decode = calibrate_poolings(parse("--last-tokens", "16", "--part", "v"))
    assert decode is None and (prompt.last_tokens, prompt.part) == (16, "v")  # the decode pooling follows the prompt's
    prompt, decode = calibrate_poolings(parse("--decode-part", "k"))
    assert prompt is not None and prompt.part == "kv" and decode.part == "k" and decode.last_tokens == prompt.last_tokens

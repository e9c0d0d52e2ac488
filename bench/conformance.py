"""Conformance with the reference's own unit tests: run its test files on `transformers`, then on loom.

    python bench/conformance.py --reference PATH [--sdist PATH | --sdist-version 5.25.0] [--cache DIR] [FILE ...]

PATH is a checkout of the reference's public repository (a directory holding tests/), or a bare git directory
(e.g. a snapshot fetched to /work/.mirror/<owner>+<name>/repo), whose HEAD's tests/ is exported. The shared test
helpers (tests/*_common.py ...) come from the PyPI source distribution: `--sdist` names the .tar.gz, otherwise
`pip download --no-binary :all: --no-deps transformers==<version>` fetches it into a temporary directory. Nothing
is copied into this repository: the run directory is a temporary directory (kept with --keep).

Each FILE (default: the issue's list) runs in its own pytest subprocess twice: on the installed `transformers`,
then with `transformers` aliased to loom (bench/conformance_alias.py says how submodule imports resolve). Output:
per file, collected / passing on the reference / passing on loom / the share of the reference-passing tests that
pass on loom, and loom's failures among those grouped by cause. Results are recorded test by test (a file that runs
past --timeout keeps what it finished; pytest-timeout, when installed, stops a single test after
--per-test-timeout). `--cache DIR` keeps them and reuses the reference's on the next run (`--rerun-reference`).
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LOOM_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_FILES = [
    "tests/generation/test_logits_process.py", "tests/generation/test_stopping_criteria.py",
    "tests/generation/test_streamers.py", "tests/generation/test_configuration_utils.py",
    "tests/trainer/test_data_collator.py", "tests/trainer/test_training_args.py",
    "tests/trainer/test_trainer_callback.py", "tests/optimization/test_optimization.py",
    "tests/tokenization/test_tokenization_utils.py", "tests/tokenization/test_tokenization_fast.py",
    "tests/utils/test_hf_argparser.py", "tests/utils/test_model_output.py", "tests/utils/test_configuration_utils.py",
    "tests/utils/test_cache_utils.py", "tests/utils/test_chat_template_utils.py",
    "tests/models/bert/test_modeling_bert.py", "tests/models/gpt2/test_modeling_gpt2.py",
    "tests/models/llama/test_modeling_llama.py",
]

# test id (file::class::name, a prefix matches) -> why loom deliberately behaves differently
_STOP_STRINGS = "tests/generation/test_stopping_criteria.py::StoppingCriteriaTestCase::test_stop_string_"
_MODEL_TESTS = ("tests/models/bert/test_modeling_bert.py::BertModelTest",
                "tests/models/gpt2/test_modeling_gpt2.py::GPT2ModelTest",
                "tests/models/llama/test_modeling_llama.py::LlamaModelTest")
KNOWN_DIFFERENCES: dict[str, str] = {
    _STOP_STRINGS + "matching_positions": "StopStringCriteria decodes the text tail instead of precomputing "
    "token-embedding tables; the reference's private _stop_string_* helpers have no counterpart",
    _STOP_STRINGS[:-len("test_stop_string_")] + "test_stop_string_embedding_vecs": "same: private embedding tables",
    _STOP_STRINGS + "matching_mode_helpers": "same: private matching-mode helpers",
    **dict.fromkeys([f"tests/generation/test_logits_process.py::LogitsProcessorTest::{name}" for name in (
        "test_early_stop_processor", "test_dia_classifier_free_guidance", "test_dia_channel_filter",
        "test_dia_delay_pattern")], "a processor of an audio family loom does not ship (Bark, Dia)"),
    **dict.fromkeys([f"tests/tokenization/test_tokenization_utils.py::TokenizerUtilsTest::{name}" for name in (
        "test_batch_encoding_word_to_tokens", "test_padding_accepts_tensors", "test_padding_accepts_tensors_pt",
        "test_extra_special_tokens_multimodal", "test_len_tokenizer")],
        "offline, the hub tokenizer is absent: loom raises OSError naming "
        "the files it looked for; the reference builds an empty placeholder vocabulary and passes vacuously"),
    **dict.fromkeys([f"tests/tokenization/test_tokenization_fast.py::{name}" for name in (
        "PatchMistralRegexHubCallTests::test_hub_error_does_not_break_init",
        "PatchMistralRegexHubCallTests::test_local_files_only_skips_model_info")],
        "patches the reference's private _patch_mistral_regex hook, which loom does not have"),
    **dict.fromkeys([f"tests/utils/test_hf_argparser.py::HfArgumentParserTest::{name}" for name in (
        "test_14_valid_dict_input_parsing", "test_16_cli_input_parsing")], "sets accelerator_config, which loom's "
        "TrainingArguments refuses by name: its Trainer does not run on Accelerate"),
    **{f"{test}::test_inherits_generation_mixin": "asks for a GenerationMixin base class; loom's models generate "
       "through PreTrainedModel.generate (can_generate)" for test in _MODEL_TESTS},
    **dict.fromkeys([f"{test}::{name}" for test in _MODEL_TESTS for name in (
        "test_gradient_checkpointing_enable_disable", "test_training_gradient_checkpointing",
        "test_training_gradient_checkpointing_use_reentrant_false",
        "test_training_gradient_checkpointing_use_reentrant_true")], "looks for the reference's "
        "GradientCheckpointingLayer modules; loom checkpoints its blocks from the model's forward (maybe_checkpoint)"),
    **{f"{test}::test_can_load_ignoring_mismatched_shapes": "builds a config with num_labels=42 over an id2label of "
       "3 entries; loom refuses a num_labels that disagrees with id2label (the reference lets num_labels win)"
       for test in _MODEL_TESTS},
    # the shared helpers are imported with the real package (see SHARED_HELPERS), so the classes they name are the
    # reference's own: a check against them measures the harness, not loom
    **dict.fromkeys([f"{test}::{name}" for test in _MODEL_TESTS[1:] for name in (
        "test_greedy_generate_dict_outputs", "test_sample_generate_dict_output",
        "test_beam_search_generate_dict_output", "test_beam_sample_generate_dict_output", "test_greedy_generate_dict_outputs_use_cache",
        "test_beam_search_generate_dict_outputs_use_cache")], "harness: generation/test_utils.py checks the outputs "
        "with isinstance against the reference's own GenerateDecoderOnlyOutput / Cache classes"),
    **dict.fromkeys([f"{test}::test_causal_lm_can_accept_training_kwargs" for test in _MODEL_TESTS[1:]],
                    "harness: causal_lm_tester.py builds the model with the reference's own AutoModelForCausalLM"),
    "tests/trainer/test_training_args.py::TestTrainingArguments::test_debug_option_parsing": "loom has no debug "
    "features (underflow_overflow, tpu_metrics_debug): TrainingArguments refuses debug= by name",
    "tests/trainer/test_training_args.py::TestTrainingArguments::test_kubeflow_auto_enable": "report_to='all' "
    "enabling Kubeflow, a tracking service loom does not ship",
    **dict.fromkeys([f"tests/trainer/test_trainer_callback.py::{name}" for name in (
        "KubeflowCallbackTest::", "SwanLabCallbackTest::", "TrackioCallbackTest::")],
        "an integration callback of a tracking service loom does not ship (Kubeflow, SwanLab, Trackio)"),
    **dict.fromkeys([f"tests/trainer/test_trainer_callback.py::StatefulCallbackTest::{name}" for name in (
        "test_early_stopping_state_persists", "test_mixed_stateful_and_regular_callbacks",
        "test_multiple_instances_of_same_stateful_callback", "test_missing_stateful_callback_warning")],
        "on resume loom restores a stateful callback's attributes but keeps this run's constructor arguments, and "
        "a stateful callback without saved state is an error, not a warning"),
}

# The shared test helpers the listed files import (mixins, ids_tensor, model testers). They are the harness, not the
# surface under test, and import the reference's internals at their top, so on the loom run they are imported with
# the real package before the alias goes in; the names a test file imports itself come from loom.
SHARED_HELPERS = ("tests.test_modeling_common", "tests.test_configuration_common", "tests.causal_lm_tester",
                  "tests.test_pipeline_mixin", "tests.generation.test_utils")

CONFTEST = '''\
import importlib, json, os, sys
import transformers.testing_utils
_constants = os.path.join(os.path.dirname(__file__), "snapshot_constants.json")
for _name, _value in json.loads(open(_constants, encoding="utf-8").read()).items():
    if not hasattr(transformers.testing_utils, _name):  # the snapshot's test data defaults (see build_run_dir)
        setattr(transformers.testing_utils, _name, _value)
if os.environ.get("CONFORMANCE_TARGET") == "loom":
    for helper in {helpers!r}:
        try:
            importlib.import_module(helper)
        except Exception:  # a helper broken on the reference too: the tests that need it fail on both runs
            pass
    sys.path.insert(0, {bench!r})
    import conformance_alias
    conformance_alias.install()
else:
    sys.path.insert(0, {bench!r})
    import conformance_alias
    conformance_alias.lenient_reference()


def pytest_configure(config):
    for marker in ("generate", "is_training_test", "is_tensor_parallel_test", "is_fsdp_test", "flash_attn_test",
                   "flash_attn_3_test", "flash_attn_4_test", "all_flash_attn_test", "bitsandbytes"):
        config.addinivalue_line("markers", marker)


def _record(nodeid, outcome, report):
    # one line per result as it happens, so a file killed by the timeout keeps what it had done
    text = str(report.longrepr) if report.longrepr else ""
    with open(os.environ["CONFORMANCE_RESULTS"], "a", encoding="utf-8") as out:
        out.write(json.dumps({{"id": nodeid, "outcome": outcome, "text": text[-4000:]}}) + "\\n")


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        if report.when == "teardown" and report.outcome == "passed":
            return
        _record(report.nodeid, "skipped" if report.skipped else report.outcome, report)


def pytest_collectreport(report):
    if report.failed:
        _record(report.nodeid + "::", "failed", report)
'''


def export_reference(reference: Path, dest: Path) -> Path:
    """A directory holding the reference's tests/: the checkout itself, or HEAD of a bare git directory."""
    if (reference / "tests").is_dir():
        return reference
    if not (reference / "HEAD").is_file():
        sys.exit(f"--reference {reference}: neither a checkout with tests/ nor a bare git directory")
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", f"--git-dir={reference}", "archive", "HEAD", "tests", "utils/test_module",
                              "src/transformers/testing_utils.py"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "x", "-C", str(dest)], input=archive, check=True)
    return dest


def sdist_archive(args, tmp: Path) -> Path:
    if args.sdist:
        return Path(args.sdist)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                    f"transformers=={args.sdist_version}", "-d", str(tmp / "sdist")], check=True)
    return next((tmp / "sdist").glob("transformers-*.tar.gz"))


def build_run_dir(checkout: Path, sdist: Path, files: list[str], run: Path) -> None:
    """The reference's tests/ minus other model families' folders, the listed files, the sdist's helpers."""
    shutil.copytree(checkout / "tests", run / "tests", ignore=shutil.ignore_patterns("models"))
    (run / "tests" / "models").mkdir()
    if (checkout / "utils" / "test_module").is_dir():  # custom classes that tests/utils/* import by path
        shutil.copytree(checkout / "utils" / "test_module", run / "utils" / "test_module")
    shutil.copy2(checkout / "tests" / "models" / "__init__.py", run / "tests" / "models" / "__init__.py")
    for name in files:
        source = checkout / name
        if not source.exists():
            sys.exit(f"{name}: not in the reference checkout {checkout}")
        for parent in source.relative_to(checkout).parents:
            init = checkout / parent / "__init__.py"
            if init.exists() and not (run / parent / "__init__.py").exists():
                (run / parent).mkdir(parents=True, exist_ok=True)
                shutil.copy2(init, run / parent / "__init__.py")
        shutil.copy2(source, run / name)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "tests" and member.isfile() and parts[2].endswith(".py"):
                (run / "tests" / parts[2]).write_bytes(archive.extractfile(member).read())
    # test_pipeline_mixin reads src/transformers/__init__.py of a checkout: point it at the installed package
    installed = importlib.util.find_spec("transformers")
    if installed is not None and installed.submodule_search_locations:
        (run / "src").mkdir()
        (run / "src" / "transformers").symlink_to(list(installed.submodule_search_locations)[0])
    _bridge_helper_versions(checkout, run)
    (run / "conftest.py").write_text(CONFTEST.format(bench=str(LOOM_ROOT / "bench"), helpers=SHARED_HELPERS))
    (run / "pytest.ini").write_text("[pytest]\n")


PLACEHOLDER_MODULE = '''\
"""Stands for a tests/ module that the source distribution's helpers import but that neither it nor the snapshot
has: every name is a placeholder whose use fails, so only the tests that need it fail (on both runs)."""
import sys
sys.path.insert(0, {bench!r})
from conformance_alias import Missing


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return Missing(name, __name__)
'''


def _bridge_helper_versions(checkout: Path, run: Path) -> None:
    """The test files are the snapshot's and the shared helpers the source distribution's, which can be of different
    versions. Two bridges keep the pair importable, the same for both runs:
      * data constants that the snapshot's tests import from `transformers.testing_utils` and the installed package
        lacks (e.g. `_TEXT_MODEL_TESTER_DEFAULTS`, the tester defaults of causal_lm_tester.py) are taken from the
        snapshot's own testing_utils.py (literals only) into snapshot_constants.json, set by the conftest;
      * a `tests/<module>` that a helper imports relatively but that neither source has becomes a placeholder module.
    """
    import ast

    constants = {}
    source = checkout / "src" / "transformers" / "testing_utils.py"
    if source.exists():
        for node in ast.parse(source.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id.startswith("_") and node.targets[0].id.isupper()):
                try:
                    constants[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    (run / "snapshot_constants.json").write_text(json.dumps(constants))
    for helper in (run / "tests").glob("*.py"):
        for module in re.findall(r"^from \.(\w+) import", helper.read_text(encoding="utf-8"), flags=re.M):
            if not (run / "tests" / f"{module}.py").exists() and not (run / "tests" / module).is_dir():
                (run / "tests" / f"{module}.py").write_text(PLACEHOLDER_MODULE.format(bench=str(LOOM_ROOT / "bench")))


def run_file(run: Path, name: str, target: str, results: Path, timeout: int, per_test: int) -> str:
    env = dict(os.environ, CONFORMANCE_TARGET=target, CONFORMANCE_RESULTS=str(results), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(run), str(LOOM_ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pytest", name, "-q", "-p", "no:cacheprovider", "--rootdir", str(run)]
    if per_test and importlib.util.find_spec("pytest_timeout") is not None:
        command.append(f"--timeout={per_test}")  # pytest-timeout registers itself when installed
    try:
        result = subprocess.run(command, cwd=run, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout}s (the results so far are kept)"
    return result.stdout[-3000:] + result.stderr[-3000:]


def outcomes(results: Path) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, cause); a collection error is one entry, `<file>::`, for the whole file."""
    if not results.exists():
        return {}
    out = {}
    for line in results.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        outcome, text = record["outcome"], record["text"]
        if out.get(record["id"], ("passed",))[0] != "passed":
            continue  # a failed call then a failed teardown: keep the first cause
        out[record["id"]] = (outcome, cause_of(text) if outcome == "failed" else "")
    return out


def cause_of(text: str) -> str:
    """A short failure cause: exception type plus the missing name where there is one."""
    for line in reversed(text.splitlines()):
        found = re.search(r"(ImportError|ModuleNotFoundError): (cannot import name '[^']+'|No module named '[^']+')",
                          line)
        if found:
            return f"{found.group(1)}: {found.group(2)}"
        found = re.search(r"AttributeError: .*?(has no attribute '[^']+'|object has no attribute '[^']+')", line)
        if found:
            return f"AttributeError: {found.group(1)}"
    for line in reversed(text.splitlines()):
        found = re.match(r"E\s+([A-Za-z_.]*(?:Error|Exception|Failed|Timeout|Warning)\b)", line)
        if found:
            return found.group(1).rsplit(".", 1)[-1]
    return "Timeout" if "Timeout" in text else (text.strip().splitlines() or ["unknown"])[-1][:80]


def compare(name: str, reference: dict, loom: dict) -> dict:
    ref_pass = {t for t, (o, _) in reference.items() if o == "passed"}
    loom_pass = {t for t, (o, _) in loom.items() if o == "passed"}
    collection_error = next((c for t, (o, c) in loom.items() if o == "failed" and t.endswith("::")), None)
    causes = collections.Counter()
    known = {}
    for test in sorted(ref_pass - loom_pass):
        reason = next((r for prefix, r in KNOWN_DIFFERENCES.items() if test.startswith(prefix)), None)
        if reason:
            known[test] = reason
            continue
        outcome, cause = loom.get(test, ("failed", collection_error or "not collected"))
        causes["skipped on loom" if outcome == "skipped" else cause] += 1
    return {"collected": len(reference), "ref_pass": len(ref_pass), "loom_pass": len(ref_pass & loom_pass),
            "causes": causes, "known": known}


def check_test_dependencies() -> None:
    """The shared helpers import these; say so before every file fails on collection."""
    import importlib.util

    missing = [name for name in ("parameterized", "pytest") if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"the reference's test helpers need {', '.join(missing)}: pip install {' '.join(missing)} "
                 "(or put them on PYTHONPATH)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", default=DEFAULT_FILES)
    parser.add_argument("--reference", type=Path, help="the reference checkout or bare git directory")
    parser.add_argument("--sdist", help="the transformers source distribution (.tar.gz)")
    parser.add_argument("--sdist-version", default="5.25.0")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per file and run")
    parser.add_argument("--per-test-timeout", type=int, default=120, help="seconds per test (pytest-timeout)")
    parser.add_argument("--cache", type=Path, help="keep the per-test results here; reuse the reference's")
    parser.add_argument("--rerun-reference", action="store_true")
    parser.add_argument("--causes", type=int, default=6, help="causes listed per file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    parser.add_argument("--report-only", action="store_true", help="print the table from --cache without running")
    args = parser.parse_args()
    if not args.report_only:
        if args.reference is None:
            parser.error("--reference is required (unless --report-only)")
        check_test_dependencies()

    tmp = Path(tempfile.mkdtemp(prefix="loom-conformance-"))
    if args.report_only and not args.cache:
        sys.exit("--report-only reads the results of an earlier run: pass its --cache DIR")
    if not args.report_only:
        checkout = export_reference(args.reference.resolve(), tmp / "reference")
        build_run_dir(checkout, sdist_archive(args, tmp), args.files, tmp / "run")
    records = args.cache or tmp / "results"
    records.mkdir(parents=True, exist_ok=True)

    rows = []
    for name in args.files:
        stem = name.removeprefix("tests/").removesuffix(".py").replace("/", "__")
        results = {}
        for target in ("reference", "loom"):
            record = records / f"{stem}.{target}.jsonl"
            if not args.report_only and (target == "loom" or args.rerun_reference or not record.exists()):
                record.unlink(missing_ok=True)
                log = run_file(tmp / "run", name, target, record, args.timeout, args.per_test_timeout)
                if "timed out" in log or not record.exists():
                    print(f"{name} [{target}]: {log.strip().splitlines()[-1][:300] if log.strip() else 'no output'}",
                          file=sys.stderr)
            results[target] = outcomes(record)
        row = compare(name, results["reference"], results["loom"])
        rows.append((name, row))
        print_row(name, row, args.causes)
    print_table(rows)
    if args.keep:
        print(f"run directory: {tmp / 'run'}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def share(row: dict, excluding_known: bool = False) -> str:
    base = row["ref_pass"] - (len(row["known"]) if excluding_known else 0)
    return f"{100 * row['loom_pass'] / base:.0f}%" if base else "-"


def print_row(name: str, row: dict, limit: int) -> None:
    print(f"\n{name}: collected {row['collected']}, reference passes {row['ref_pass']}, loom passes "
          f"{row['loom_pass']} ({share(row)})", flush=True)
    for cause, count in row["causes"].most_common(limit):
        print(f"    {count:4d}  {cause}")
    for test, reason in row["known"].items():
        print(f"    known difference: {test}: {reason}")


def print_table(rows: list) -> None:
    print("\n| file | collected | pass (reference) | pass (loom) | loom / reference | excluding known differences |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows:
        print(f"| {name.removeprefix('tests/')} | {row['collected']} | {row['ref_pass']} | {row['loom_pass']} | "
              f"{share(row)} | {share(row, excluding_known=True)} |")
    ref = sum(r["ref_pass"] for _, r in rows)
    ok = sum(r["loom_pass"] for _, r in rows)
    total = sum(r["collected"] for _, r in rows)
    known = sum(len(r["known"]) for _, r in rows)
    print(f"| **all** | {total} | {ref} | {ok} | {100 * ok / max(ref, 1):.0f}% | {100 * ok / max(ref - known, 1):.0f}% |")


if __name__ == "__main__":
    main()

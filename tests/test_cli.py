"""The `loom` command line: JSON output of `run`, stdin input, errors, env, help."""
from __future__ import annotations

import io
import json

import pytest

from loom.cli import main


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    import shutil

    import torch
    import transformers

    from loom.hub import packaged_model_dir

    config = transformers.GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=101, eos_token_id=102, pad_token_id=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli_gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    minilm = packaged_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, path / name)
    tokenizer_config = json.loads((minilm / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def run_cli(capsys, monkeypatch, argv, stdin=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_run_prints_json(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, ["run", "sentence-similarity", "--json",
                                                 '{"source_sentence": "A man is eating food.", "sentences": '
                                                 '["A man eats bread.", "Stocks fell sharply."]}'])
    assert code == 0
    scores = json.loads(out)
    assert len(scores) == 2 and scores[0] > scores[1]


def test_run_reads_stdin_lines(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, ["run", "feature-extraction", "--param", "pooling=auto", "-"],
                           stdin="A man is eating.\n\nA dog runs.\n")
    assert code == 0
    vectors = json.loads(out)
    assert len(vectors) == 2 and all(len(v) == 384 for v in vectors)


def test_run_matches_the_python_api(capsys, monkeypatch):
    import loom

    code, out, _ = run_cli(capsys, monkeypatch, ["run", "feature-extraction", "-p", "pooling=mean", "hello"])
    expected = loom.pipeline("feature-extraction")("hello", pooling="mean")
    assert code == 0 and json.loads(out) == pytest.approx(expected, abs=1e-6)


def test_unknown_task_is_an_error_not_a_trace(capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, ["run", "no-such-task", "x"])
    assert code == 1 and out == ""
    assert "unknown task 'no-such-task'" in err and "Traceback" not in err


def test_bad_param_and_bad_json(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["run", "feature-extraction", "--param", "novalue", "x"])
    with pytest.raises(SystemExit, match="not valid JSON"):
        main(["run", "feature-extraction", "--json", "{oops"])


def test_env_lists_versions_devices_and_backends(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, ["env", "--json"])
    info = json.loads(out)
    assert code == 0 and info["torch"] and "cpu" in info["devices"]
    assert set(info["optional backends"]) >= {"accelerate", "bitsandbytes", "pillow"}
    assert {"compressed-tensors", "GPTQ", "AWQ", "FP8 (quant_method fp8)", "torchao (safetensors)"} <= set(
        info["quantized checkpoints"])
    assert "dequantized" in info["quantized checkpoints"]["compressed-tensors"]


def test_help_names_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "generate", "chat", "convert", "env"):
        assert command in out


def test_convert_reports_a_missing_checkpoint(capsys, monkeypatch, tmp_path):
    code, _, err = run_cli(capsys, monkeypatch, ["convert", "dcp-to-hf", str(tmp_path / "nope"), str(tmp_path / "o")])
    assert code == 1 and "not a DCP checkpoint" in err


def test_generate_streams_tokens(capsys, monkeypatch, gpt2_dir):
    code, out, _ = run_cli(capsys, monkeypatch, ["generate", "--model", str(gpt2_dir), "hello", "world",
                                                 "--max-new-tokens", "4"])
    assert code == 0 and out.startswith("hello world") and len(out) > len("hello world")


def test_chat_keeps_history(capsys, monkeypatch, gpt2_dir):
    code, out, _ = run_cli(capsys, monkeypatch, ["chat", "--model", str(gpt2_dir), "--max-new-tokens", "3"],
                           stdin="hi there\nand again\n\n")
    assert code == 0 and out.count("assistant> ") == 2


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2", "mixtral", "phi3"])
def test_generate_and_chat_on_other_families(capsys, monkeypatch, tmp_path_factory, gpt2_dir, model_type):
    """`loom generate` / `loom chat` run every decoder family (the Auto classes pick it from config.json)."""
    import shutil

    from loom.auto import model_table
    from loomtest import reference_checkpoint

    cls = model_table()[model_type][1]["causal-lm"].__name__
    path, _ = reference_checkpoint(tmp_path_factory, model_type, cls, vocab_size=30522, bos_token_id=101,
                                   eos_token_id=102, pad_token_id=0)
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(gpt2_dir / name, path / name)
    code, out, _ = run_cli(capsys, monkeypatch, ["generate", "--model", str(path), "hello", "world",
                                                 "--max-new-tokens", "4"])
    assert code == 0 and out.startswith("hello world") and len(out) > len("hello world")
    code, out, _ = run_cli(capsys, monkeypatch, ["chat", "--model", str(path), "--max-new-tokens", "3"],
                           stdin="hi there\nand again\n\n")
    assert code == 0 and out.count("assistant> ") == 2

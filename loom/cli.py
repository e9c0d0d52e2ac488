"""The `loom` command: run a pipeline, generate or chat with a model, convert checkpoints, report the environment.

    loom run sentiment-analysis --model ./my-classifier "I love it" "I hate it"
    echo "A man is eating." | loom run feature-extraction --param pooling=auto -
    loom generate --model ./tiny-llama "Once upon a time" --max-new-tokens 40
    loom chat --model ./tiny-llama-instruct
    loom convert dcp-to-hf ./dcp-checkpoint ./hf-checkpoint
    loom env
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

QUANTIZE_CHOICES = ("int8", "int4", "bnb-8bit", "bnb-4bit")


# -- shared helpers ---------------------------------------------------------------------------------------------------
def _parse_param(text: str) -> tuple[str, Any]:
    """KEY=VALUE, with VALUE read as JSON when it parses (3, true, ["a","b"]) and as a string otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param {text!r} must look like key=value (e.g. top_k=3)")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def _read_inputs(values: list[str], as_json: bool) -> list[Any]:
    """Inputs from the command line; "-" reads stdin, one input per non-empty line."""
    inputs: list[Any] = []
    for value in values:
        if value == "-":
            inputs += [line.rstrip("\n") for line in sys.stdin if line.strip()]
        else:
            inputs.append(value)
    if as_json:
        parsed = []
        for i, text in enumerate(inputs):
            try:
                parsed.append(json.loads(text))
            except json.JSONDecodeError as e:
                raise SystemExit(f"loom: input {i + 1} is not valid JSON ({e}): {text[:60]!r}") from None
        return parsed
    return inputs


def _model_kwargs(args) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if getattr(args, "quantize", None):
        from loom.quantization.config import config_from_flag

        kwargs["quantization_config"] = config_from_flag(args.quantize)
    return kwargs


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False, default=_json_default)
    sys.stdout.write("\n")


def _json_default(value: Any):
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    raise TypeError(f"cannot print {type(value).__name__} as JSON")


def _progress(iterable, total: int, enabled: bool):
    """A progress bar on stderr for long runs, silent when stderr is not a terminal."""
    if not enabled or total < 2 or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, unit="input", file=sys.stderr)


def _add_model_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--model", "-m", required=required,
                        help="checkpoint directory or hub id (e.g. sentence-transformers/all-MiniLM-L6-v2)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="load the weights quantized: built-in int8/int4, or bitsandbytes 8-bit/4-bit NF4")


# -- subcommands ------------------------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from loom.pipelines import pipeline

    params = dict(args.param or [])
    inputs = _read_inputs(args.inputs, args.json)
    if not inputs:
        raise SystemExit("loom run: no inputs; pass them as arguments or '-' to read lines from stdin")
    pipe = pipeline(args.task, model=args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                    model_kwargs=_model_kwargs(args) or None)
    results = list(_progress(pipe(iter(inputs), **params), len(inputs), True))
    _print_json(results[0] if len(results) == 1 else results)
    return 0


def _load_causal_lm(args):
    from loom.auto import AutoModelForCausalLM
    from loom.tokenization import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, **_model_kwargs(args))
    if args.device:
        model.to(args.device)
    return model.eval(), tokenizer


def _generation_kwargs(args) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.do_sample or args.temperature is not None or args.top_p is not None:
        kwargs["do_sample"] = True
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    if args.top_p is not None:
        kwargs["top_p"] = args.top_p
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    return kwargs


def _generation_inputs(encoding, model) -> dict:
    """input_ids and attention_mask on the model's device (decoders take no token_type_ids)."""
    return {k: encoding[k].to(model.device) for k in ("input_ids", "attention_mask") if k in encoding}


def cmd_generate(args) -> int:
    from loom.generation import TextStreamer

    model, tokenizer = _load_causal_lm(args)
    prompt = " ".join(_read_inputs(args.prompt, False))
    enc = _generation_inputs(tokenizer(prompt, return_tensors="pt"), model)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.generate(**enc, streamer=streamer, **_generation_kwargs(args))
    return 0


def cmd_chat(args) -> int:
    from loom.generation import TextStreamer

    model, tokenizer = _load_causal_lm(args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"Chatting with {args.model}. Empty line or Ctrl-D to quit, /reset to forget the conversation.",
          file=sys.stderr)
    while True:
        try:
            user = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not user.strip():
            return 0
        if user.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": user})
        enc = _generation_inputs(tokenizer.apply_chat_template(history, add_generation_prompt=True,
                                                               return_dict=True, return_tensors="pt"), model)
        sys.stdout.write("assistant> ")
        sys.stdout.flush()
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        out = model.generate(**enc, streamer=streamer, **_generation_kwargs(args))
        reply = tokenizer.decode(out[0, enc["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})


def cmd_convert(args) -> int:
    if args.kind != "dcp-to-hf":
        raise SystemExit(f"loom convert: unknown conversion {args.kind!r}; known: dcp-to-hf")
    try:
        from loom.distributed import dcp_to_hf
    except (ImportError, AttributeError):
        raise SystemExit("loom convert dcp-to-hf requires loom.distributed (dcp_to_hf), which this install lacks")
    out = dcp_to_hf(args.source, args.output, dtype=args.dtype)
    print(f"wrote {out}", file=sys.stderr)
    return 0


# -- loom env ---------------------------------------------------------------------------------------------------------
def _expect(condition: bool, problem: str) -> None:
    if not condition:
        raise RuntimeError(problem)


def _check_accelerate() -> str:
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        layer = torch.nn.Linear(4, 4)
    _expect(layer.weight.is_meta, "init_empty_weights did not build on the meta device")
    return "meta init ok"


def _check_bitsandbytes() -> str:
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    devices = sorted(getattr(bnb, "supported_torch_devices", ()) or ())
    device = "cuda" if torch.cuda.is_available() and "cuda" in devices else "cpu"
    w = torch.randn(64, 64, device=device)
    q, state = quantize_4bit(w, quant_type="nf4")
    err = (dequantize_4bit(q, state) - w).abs().mean().item()
    _expect(err < 0.2, f"nf4 round trip error {err:.3f}")
    return f"nf4 round trip on {device} ok; backends: {', '.join(devices) or 'unknown'}"


def _check_sentencepiece() -> str:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world", "loom env check", "a b c d e"] * 20),
                                   model_writer=model, vocab_size=20, minloglevel=3)
    pieces = spm.SentencePieceProcessor(model_proto=model.getvalue()).encode("hello", out_type=str)
    _expect(bool(pieces), "empty encoding")
    return "train + encode ok"


def _check_optuna() -> str:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1) ** 2, n_trials=2)
    return "in-memory study ok"


def _check_datasets() -> str:
    import datasets

    _expect(datasets.Dataset.from_dict({"a": [1, 2]})[1] == {"a": 2}, "Dataset indexing returned the wrong row")
    return "in-memory Dataset ok"


def _check_tensorboard() -> str:
    import tempfile

    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(log_dir=tmp)
        writer.add_scalar("check", 1.0, 0)
        writer.close()
    return "SummaryWriter ok"


def _check_pillow() -> str:
    from PIL import Image

    _expect(Image.new("RGB", (8, 8), "red").resize((4, 4)).getpixel((0, 0)) == (255, 0, 0), "resize changed colours")
    return "image ops ok"


def _check_jinja2() -> str:
    import jinja2

    _expect(jinja2.Template("{{ x }}").render(x=1) == "1", "template rendered wrongly")
    return "template ok"


# name -> (distribution, what loom uses it for, check that imports it and exercises it)
OPTIONAL_BACKENDS = {
    "accelerate": ("accelerate", "device_map='auto' / several devices / disk offload", _check_accelerate),
    "bitsandbytes": ("bitsandbytes", "BitsAndBytesConfig 8-bit and 4-bit", _check_bitsandbytes),
    "sentencepiece": ("sentencepiece", "not needed: loom reads tokenizer.model files itself", _check_sentencepiece),
    "optuna": ("optuna", "Trainer.hyperparameter_search", _check_optuna),
    "datasets": ("datasets", "datasets.Dataset as Trainer input", _check_datasets),
    "tensorboard": ("tensorboard", "report_to='tensorboard'", _check_tensorboard),
    "pillow": ("pillow", "image pipelines and processors", _check_pillow),
    "jinja2": ("jinja2", "chat templates", _check_jinja2),
}


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _backend_status(distribution: str, check, run_check: bool) -> dict[str, str]:
    version = _dist_version(distribution)
    if version is None:
        return {"version": "not installed", "status": "missing"}
    if not run_check:
        return {"version": version, "status": "installed (not checked)"}
    try:
        detail = check()
    except ImportError as e:
        return {"version": version, "status": "broken", "detail": f"import failed: {e}"}
    except Exception as e:  # a broken install (e.g. bitsandbytes without its native library) is reported, not raised
        return {"version": version, "status": "broken", "detail": f"{type(e).__name__}: {e}"[:200]}
    return {"version": version, "status": "works", "detail": detail}


def _devices() -> list[str]:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} ({p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor})")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def environment(check_backends: bool = True) -> dict[str, Any]:
    """Versions, devices, threads and the optional backends (whether each imports and works): what `loom env` prints.

    With check_backends=False the backends are only looked up in the installed package metadata (nothing imported).
    """
    import os
    import platform

    import torch

    import loom

    info: dict[str, Any] = {"loom": loom.__version__, "python": platform.python_version(),
                            "platform": platform.platform()}
    for name in ("torch", "tokenizers", "safetensors", "numpy", "huggingface_hub"):
        info[name] = _dist_version(name) or "not installed"
    info["devices"] = _devices()
    info["cuda"] = f"{torch.version.cuda} (cuDNN {torch.backends.cudnn.version()})" if torch.version.cuda else "none"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["threads"] = {"cpu cores": os.cpu_count(), "usable by this process": affinity,
                       "torch intra-op": torch.get_num_threads(), "torch inter-op": torch.get_num_interop_threads(),
                       **{var: os.environ[var] for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS",
                                                           "TOKENIZERS_PARALLELISM") if var in os.environ}}
    from loom.kernels import build

    info["loom kernels"] = build.describe()
    from loom.quantization.registry import CHECKPOINT_FORMATS

    info["quantized checkpoints"] = {name: f"loads: {loads}. runs: {runs}. saves: {saves}"
                                     for name, (loads, runs, saves) in CHECKPOINT_FORMATS.items()}
    info["optional backends"] = {name: {**_backend_status(dist, check, check_backends), "used for": used_for}
                                 for name, (dist, used_for, check) in OPTIONAL_BACKENDS.items()}
    return info


def _format_backend(name: str, b: dict[str, str]) -> str:
    detail = f" ({b['detail']})" if b.get("detail") else ""
    return f"  {name:14s} {b['version']:14s} {b['status']}{detail}  [{b['used for']}]"


def cmd_env(args) -> int:
    info = environment(check_backends=not args.no_check)
    if args.json:
        _print_json(info)
        return 0
    for key, value in info.items():
        if key == "optional backends":
            print(f"{key}:")
            for name, backend in value.items():
                print(_format_backend(name, backend))
        elif isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:24s} {v}")
        elif isinstance(value, list):
            print(f"{key:16s} {', '.join(value)}")
        else:
            print(f"{key:16s} {value}")
    return 0


# -- parser -----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from loom.pipelines.registry import ALIASES, TASKS

    parser = argparse.ArgumentParser(prog="loom", description="Run, generate with, chat with and convert "
                                     "transformer models.", epilog="Run `loom COMMAND --help` for the options of "
                                     "a command.", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a task pipeline on inputs and print JSON",
                         description="Run a pipeline and print its answers as JSON. Tasks: "
                         + ", ".join(sorted(TASKS) + sorted(ALIASES)),
                         epilog='examples:\n  loom run feature-extraction --param pooling=auto "A sentence."\n'
                                '  loom run question-answering --model ./qa --json \'{"question": "Who?", '
                                '"context": "Ann did."}\'\n  cat texts.txt | loom run sentiment-analysis --model '
                                './clf --batch-size 16 -',
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("task", help="task name, e.g. text-classification, ner, fill-mask, feature-extraction")
    run.add_argument("inputs", nargs="+", metavar="INPUT", help="texts, image paths, or '-' to read stdin lines")
    _add_model_options(run, required=False)
    run.add_argument("--batch-size", type=int, default=None, help="inputs per forward pass (grouped by length)")
    run.add_argument("--param", "-p", action="append", type=_parse_param, metavar="KEY=VALUE",
                     help="a task argument, e.g. top_k=3, candidate_labels='[\"a\",\"b\"]' (repeatable)")
    run.add_argument("--json", action="store_true", help="parse each input as JSON (for dict inputs such as QA)")
    run.set_defaults(func=cmd_run)

    for name, func, helptext in (("generate", cmd_generate, "continue a prompt, streaming the tokens"),
                                 ("chat", cmd_chat, "chat interactively using the model's chat template")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        if name == "generate":
            p.add_argument("prompt", nargs="+", help="the prompt ('-' reads it from stdin)")
        else:
            p.add_argument("--system", default=None, help="a system message to start the conversation with")
        _add_model_options(p, required=True)
        p.add_argument("--max-new-tokens", type=int, default=128 if name == "chat" else 50)
        p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
        p.add_argument("--temperature", type=float, default=None)
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
        p.set_defaults(func=func)

    convert = sub.add_parser("convert", help="convert checkpoints (dcp-to-hf)",
                             description="Turn a distributed (DCP) training checkpoint into a normal model "
                                         "directory (config.json + safetensors).")
    convert.add_argument("kind", choices=["dcp-to-hf"])
    convert.add_argument("source", help="the DCP checkpoint directory")
    convert.add_argument("output", help="the directory to write")
    convert.add_argument("--dtype", default=None, help="cast the weights, e.g. bfloat16")
    convert.set_defaults(func=cmd_convert)

    env = sub.add_parser("env", help="show versions, devices, threads and which optional backends work",
                         description="Print versions, devices, thread settings and, for each optional backend, "
                                     "whether it imports and passes a small working check. Paste this into bug "
                                     "reports.")
    env.add_argument("--json", action="store_true", help="print JSON")
    env.add_argument("--no-check", action="store_true",
                     help="only read installed versions; import nothing optional (fast)")
    env.set_defaults(func=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, KeyError, OSError, ImportError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"loom {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

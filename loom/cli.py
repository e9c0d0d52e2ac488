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


def environment() -> dict[str, Any]:
    """Versions, devices and which optional backends import, as a dict (what `loom env` prints)."""
    import importlib
    import platform

    import loom

    info: dict[str, Any] = {"loom": loom.__version__, "python": platform.python_version(),
                            "platform": platform.platform()}
    for name in ("torch", "tokenizers", "safetensors", "numpy", "huggingface_hub"):
        try:
            info[name] = importlib.import_module(name).__version__
        except ImportError:
            info[name] = "not installed"
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    info["devices"] = devices
    optional = {"accelerate": "accelerate", "bitsandbytes": "bitsandbytes", "pillow": "PIL",
                "sentencepiece": "sentencepiece", "datasets": "datasets", "optuna": "optuna",
                "tensorboard": "tensorboard", "jinja2": "jinja2"}
    backends = {}
    for label, module in optional.items():
        try:
            mod = importlib.import_module(module)
            backends[label] = getattr(mod, "__version__", "available")
        except Exception as e:  # a broken install (e.g. bitsandbytes without CUDA) is "unusable", not a crash
            backends[label] = "not installed" if isinstance(e, ImportError) and "No module" in str(e) else \
                f"unusable ({type(e).__name__})"
    info["optional backends"] = backends
    return info


def cmd_env(args) -> int:
    info = environment()
    if args.json:
        _print_json(info)
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:14s} {v}")
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

    env = sub.add_parser("env", help="show versions, devices and optional backends")
    env.add_argument("--json", action="store_true", help="print JSON")
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

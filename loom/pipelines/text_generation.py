"""text-generation: continue plain prompts or chats (lists of {"role", "content"} messages rendered with the
tokenizer's chat template); every generation argument goes to `model.generate`, including `streamer=`."""
from __future__ import annotations

import warnings
from typing import Any

from loom.pipelines.base import Pipeline
from loom.pipelines.batching import Chunk


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


class TextGenerationPipeline(Pipeline):
    """Output per prompt: a list of {"generated_text"} (one per returned sequence). With return_full_text=True
    (the default) a text prompt is repeated in front of the continuation and a chat comes back with the new
    assistant message appended; return_tensors=True gives {"generated_token_ids"} instead."""

    task = "text-generation"
    pad_left = True
    window_per_batch = 1  # generation cost depends on new tokens, not prompt length: no point sorting far ahead

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        if _is_chat(inputs):  # one conversation, not a batch of messages
            return super().__call__([list(inputs)], **kwargs)[0]
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, return_full_text=None, return_tensors=None, return_text=None, prefix="",
                             stop_sequence=None, continue_final_message=None, skip_special_tokens=True,
                             clean_up_tokenization_spaces=None, add_special_tokens=None, truncation=None,
                             **generate_kwargs) -> tuple[dict, dict, dict]:
        if return_tensors and return_full_text is not None:
            raise ValueError("return_tensors=True returns token ids, so it cannot be combined with return_full_text")
        if generate_kwargs.get("max_new_tokens") is not None and generate_kwargs.get("max_length") is not None:
            warnings.warn("both max_new_tokens and max_length were given; max_new_tokens wins", stacklevel=4)
            generate_kwargs.pop("max_length")
        if stop_sequence is not None:
            generate_kwargs["stop_strings"] = [stop_sequence] if isinstance(stop_sequence, str) else stop_sequence
            generate_kwargs["tokenizer"] = self.tokenizer
        pre = {"prefix": prefix or "", "continue_final_message": continue_final_message,
               "add_special_tokens": add_special_tokens, "new_tokens": self._new_tokens(generate_kwargs)}
        mode = "tensors" if return_tensors else ("new" if return_full_text is False else "full")
        post = {"mode": mode, "continue_final_message": continue_final_message,
                "skip_special_tokens": skip_special_tokens, "clean_up": clean_up_tokenization_spaces}
        return pre, generate_kwargs, post

    def _new_tokens(self, generate_kwargs: dict) -> int:
        """How many tokens generation may add, to leave room for them when a prompt must be shortened."""
        if generate_kwargs.get("max_new_tokens") is not None:
            return int(generate_kwargs["max_new_tokens"])
        config = generate_kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        value = getattr(config, "max_new_tokens", None)
        return int(value) if value is not None else 20

    def preprocess(self, item, prefix="", continue_final_message=None, add_special_tokens=None, new_tokens=20):
        if _is_chat(item):
            messages = list(item)
            cont = messages[-1]["role"] == "assistant" if continue_final_message is None else continue_final_message
            enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=not cont,
                                                     continue_final_message=cont, return_dict=True)
            ids = list(enc["input_ids"])
        elif isinstance(item, str):
            opts = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            ids = list(self.tokenizer(prefix + item, **opts)["input_ids"])
        else:
            raise TypeError(f"text-generation takes a prompt string or a chat (a list of {{'role', 'content'}} "
                            f"messages), got {type(item).__name__}")
        if not ids:
            raise ValueError("the prompt is empty after tokenization and the tokenizer adds no BOS token; pass a "
                             "non-empty prompt")
        limit = self.max_length
        if limit is not None and len(ids) + new_tokens > limit:
            keep = limit - new_tokens
            if keep <= 0:
                raise ValueError(f"max_new_tokens={new_tokens} leaves no room for the prompt in the model's "
                                 f"{limit} positions; ask for fewer new tokens")
            warnings.warn(f"the prompt has {len(ids)} tokens; only its last {keep} are kept so that {new_tokens} new "
                          f"tokens fit in the model's {limit} positions", stacklevel=2)
            ids = ids[-keep:]
        return [Chunk({"input_ids": ids, "attention_mask": [1] * len(ids)}, {"prompt": item, "ids": ids})]

    def _forward(self, batch, **generate_kwargs):
        prompt_len = batch["input_ids"].shape[1]
        out = self.model.generate(**batch, **generate_kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        per_row = sequences.shape[0] // batch["input_ids"].shape[0]
        new = sequences[:, prompt_len:].reshape(batch["input_ids"].shape[0], per_row, -1)
        return {"new_tokens": [new[row] for row in range(new.shape[0])]}

    def postprocess(self, chunks: list[Chunk], mode="full", continue_final_message=None, skip_special_tokens=True,
                    clean_up=None) -> list[dict]:
        meta, new = chunks[0].meta, chunks[0].outputs["new_tokens"]
        records = []
        for tokens in new.tolist():
            if mode == "tensors":
                records.append({"generated_token_ids": meta["ids"] + tokens})
                continue
            text = self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens,
                                         clean_up_tokenization_spaces=clean_up)
            records.append({"generated_text": self._full(meta["prompt"], text, continue_final_message)
                            if mode == "full" else text})
        return records

    @staticmethod
    def _full(prompt, text: str, continue_final_message):
        if isinstance(prompt, str):
            return prompt + text
        messages = [dict(m) for m in prompt]
        cont = messages[-1]["role"] == "assistant" if continue_final_message is None else continue_final_message
        if cont:
            messages[-1]["content"] = messages[-1]["content"] + text
            return messages
        return messages + [{"role": "assistant", "content": text}]


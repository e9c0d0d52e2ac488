"""optim_args: the reference's "key=value,key=value" string of extra optimizer options, parsed and checked."""
from __future__ import annotations


def parse_optim_args(text: str | None) -> dict[str, str]:
    """optim_args "k=v,k=v" -> {k: v} (strings; each optimizer converts the keys it reads), as the reference."""
    if not text:
        return {}
    out = {}
    for item in text.replace(" ", "").split(","):
        key, sep, value = item.partition("=")
        if not sep or not key or "=" in value:
            raise ValueError(f"optim_args={text!r}: {item!r} is not of the form key=value; write e.g. "
                             "optim_args='momentum=0.9,nesterov=True'")
        out[key] = value
    return out


def is_true(text: str) -> bool:
    return text.lower() in ("true", "1", "yes")


def check_optim_options(options: dict[str, str], known: tuple[str, ...], name: str) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"optim_args {unknown} are not options of optim={name!r}; it reads "
                         f"{', '.join(known) or 'none'}")

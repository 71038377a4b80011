"""The command-line frame of the conversion tools (``tools/convert_checkpoint_to_hf.py``,
``tools/convert_hf_to_checkpoint.py``): their common flags and how they report.

No torch at import (as :mod:`megatron_lasp.hf.files`): a tool parses and
checks its flags before torch or megatron-core are imported.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Any, Dict, Optional

from megatron_lasp.data.tokenizer import TokenizerSettings, add_tokenizer_args
from megatron_lasp.hf.files import ConversionError

__all__ = ["run_tool", "tool_parser"]


def tool_parser(prog: str, doc: str, load_help: str, save_help: str) -> argparse.ArgumentParser:
    """The command-line tools' parser: ``--load``, ``--save``, ``--force`` and the tokenizer flags
    (none by default: each tool has its default tokenizer); each tool adds its own flags."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--load", required=True, help=load_help)
    parser.add_argument("--save", required=True, help=save_help)
    parser.add_argument("--force", action="store_true",
                        help="replace a non-empty --save directory (never one that holds, or lies inside, the input)")
    add_tokenizer_args(parser, default_type="")
    return parser


def run_tool(prog: str, args: argparse.Namespace, work) -> int:
    """Run a command-line tool's ``work(tokenizer_settings)`` (the settings of the tokenizer flags,
    or None): progress at INFO (megatron-core's import-time notices hidden), the line ``work``
    returns printed on success (exit status 0), a :class:`ConversionError` as one line on stderr
    (exit status 1)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron_lasp").setLevel(logging.INFO)
    # megatron-core 0.16 warns "Unknown MLP type" for every layer: our MLP subclasses its MLP
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core")
    try:
        settings = _tokenizer_settings(args)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    try:
        message = work(settings)
    except ConversionError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    print(message)
    return 0


def _tokenizer_settings(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """The tokenizer flags' settings (None: none given, the checkpoint's or model's own is used).

    Raises:
        ValueError: a tokenizer flag that is not read (no ``--tokenizer-type``, or one that does
            not read it), which would otherwise be ignored silently.
    """
    settings = TokenizerSettings.from_mapping(args)
    if not settings.tokenizer_type:
        given = [key for key, value in settings.as_dict().items() if value is not None and key != "tokenizer_type"]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ValueError(f"{flag} is used only with --tokenizer-type; add --tokenizer-type or drop {flag}")
        return None
    return settings.check_flags().as_dict()

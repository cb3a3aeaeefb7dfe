"""`maas chat DEPLOYMENT`: talk to a generative deployment from the terminal.

Interactive by default: each line you type is sent with the conversation so far (the history
is kept for the session) and the answer is printed as its tokens stream; an empty line,
`/exit` or end of input ends the session, Ctrl-C during an answer stops that answer only.
`--prompt TEXT` asks once and prints the answer as it streams; with `--json` the answer,
its finish reason and its usage are printed as one JSON document at the end instead.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import typer

from maas_cli.cli_support import state

EXIT_WORDS = frozenset({"/exit", "/quit"})


def chat(ctx: typer.Context,
         deployment: str = typer.Argument(..., help="a generative deployment's id"),
         prompt: str = typer.Option(None, "--prompt", "-p",
                                    help="ask once and print the answer as it streams"),
         system: str = typer.Option(None, "--system", help="a system message opening the chat"),
         max_tokens: int = typer.Option(None, "--max-tokens", help="tokens per answer at most"),
         temperature: float = typer.Option(None, help="0 for greedy; default 1"),
         top_p: float = typer.Option(None, "--top-p", help="nucleus sampling mass, (0, 1]"),
         top_k: int = typer.Option(0, "--top-k", help="sample among the k likeliest; 0: all"),
         stop: list[str] = typer.Option([], "--stop", help="stop before this text (repeatable)"),
         seed: int = typer.Option(None, help="seed of the sampler, for repeatable answers")):
    """Chat with DEPLOYMENT (a generative model): answers stream as they are generated."""
    cli = state(ctx)
    client = cli.client()
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    sampling: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature,
                                "top_p": top_p, "top_k": top_k, "stop": stop, "seed": seed}

    def answer(question: str, echo: bool) -> dict[str, Any]:
        history.append({"role": "user", "content": question})
        generation = client.generate(deployment, messages=list(history), **sampling)
        chunks = []
        try:
            for chunk in generation:
                chunks.append(chunk)
                if echo:
                    sys.stdout.write(chunk)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            generation.cancel()
            if not echo:
                raise
            sys.stdout.write(" [stopped]")
        finally:
            if echo:
                sys.stdout.write("\n")
        text = "".join(chunks)
        history.append({"role": "assistant", "content": text})
        return {"text": text, "finish_reason": generation.finish_reason or "cancelled",
                "usage": asdict(generation.usage) if generation.usage else None}

    if prompt is not None:
        result = answer(prompt, echo=not cli.json)
        if cli.json:
            cli.output.emit(result)
        return
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question or question in EXIT_WORDS:
            break
        answer(question, echo=True)

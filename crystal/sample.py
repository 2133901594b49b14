"""Text generation from a trained model: temperature, top-k and top-p sampling on the KV-cache
decoder (crystal.generate), several samples decoded as one batch, text streamed as it comes.

- Each new token is drawn from the logits after the sequence so far: the prompt is prefilled
  once, then each token is decoded against the cache. A context that fills block_size slides:
  its last SLIDE_KEEP of block_size tokens are kept and their cache recomputed in one forward
  (a prompt longer than block_size starts from its last block_size tokens).
- The softmax subtracts the largest logit before dividing by the temperature, so any
  temperature > 0 is safe: as it goes to 0 the draw becomes the argmax, never NaN.
  Temperature 0 is greedy (argmax). top-k keeps the k most likely tokens, then top-p the
  smallest set of the most likely whose probability reaches p (transformers' order).
- Seeds: sample i of a batch draws from its own generator, seeded seed + i, one uniform draw
  per token; so sample i of `--num-samples N --seed S` is the sample of `--seed S+i` alone.
- Text: `TextStream` gives a sequence's text as its tokens come, whole characters only (a
  token that ends inside a UTF-8 character waits for the rest), cut before the first stop
  text; the end-of-text token ends a sequence and is not printed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from crystal.errors import CrystalError

MAX_TOKENS = 100_000  # a bound on one generation
MAX_SAMPLES = 256  # --num-samples: sequences decoded together
SLIDE_KEEP = 0.75  # of block_size: the context kept when a sequence fills the model's positions
STREAM_CONTEXT = 6  # prompt tokens a TextStream decodes before the new ones (spacing rules)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        if not 0 <= self.max_tokens <= MAX_TOKENS:
            raise CrystalError(f"--max-tokens must be in [0, {MAX_TOKENS:,}], got {self.max_tokens}")
        if not (self.temperature >= 0) or self.temperature == float("inf"):
            raise CrystalError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise CrystalError(f"--top-k must be >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:  # NaN fails too
            raise CrystalError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise CrystalError(f"--seed must be >= 0, got {self.seed}")
        if any(s == "" for s in self.stop):
            raise CrystalError("--stop must be a non-empty text")


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token from one row of logits [V]: argmax at temperature 0, else one draw."""
    logits = np.asarray(logits, dtype=np.float64)
    if not np.isfinite(logits).all():
        raise CrystalError("the model's logits are not finite (NaN or inf weights in the checkpoint?)")
    if params.temperature == 0:
        return int(np.argmax(logits))
    V = logits.size
    with np.errstate(over="ignore"):  # a tiny temperature sends all but the argmax to -inf
        logits = (logits - logits.max()) / params.temperature  # <= 0, the argmax 0: exp never overflows
    if params.top_k is not None and params.top_k < V:
        kth = np.partition(logits, V - params.top_k)[V - params.top_k]
        logits[logits < kth] = -np.inf
    p = np.exp(logits)
    p /= p.sum()
    if params.top_p < 1:  # the most likely tokens until their probability reaches top_p
        order = np.argsort(-p, kind="stable")
        n = int(np.searchsorted(np.cumsum(p[order]), params.top_p)) + 1
        p[order[n:]] = 0.0
        p /= p.sum()
    return int(rng.choice(V, p=p))


def cache_capacity(prompt_lengths, max_tokens: int, block_size: int) -> int:
    """The positions of the KV cache of a batch: the longest prompt (its last block_size
    tokens) and max_tokens new tokens, at most block_size (a longer sample slides)."""
    return min(block_size, min(max(prompt_lengths), block_size) + max_tokens)


def context_window(ids: list[int], block_size: int) -> list[int]:
    """The tokens a sequence's cache is recomputed from when it no longer fits: its last
    SLIDE_KEEP * block_size (at least one)."""
    return ids[-max(1, int(block_size * SLIDE_KEEP)):]


class Generation:
    """Sequences decoded together as one batch on a KV cache: `step()` gives each live
    sequence's next token; a sequence ends at `eos`, after max_tokens, or when `end(i)` is
    called (a stop text). ids[i]: prompt i and its generated tokens."""

    def __init__(self, model, prompts: list[list[int]], params: SamplingParams, eos: int | None = None):
        from crystal.generate import Decoder

        params.check()
        V, T = model.config.vocab_size, model.config.block_size
        if not prompts or any(len(p) == 0 for p in prompts):
            raise CrystalError("every prompt needs at least one token")
        if any(not (0 <= int(t) < V) for p in prompts for t in p):
            raise CrystalError(f"prompt token ids must be in [0, {V})")
        self.params, self.eos, self.block_size = params, eos, T
        self.ids = [[int(t) for t in p] for p in prompts]
        self.n_new = [0] * len(prompts)
        self.live = [params.max_tokens > 0] * len(prompts)
        self.rngs = [np.random.default_rng(params.seed + i) for i in range(len(prompts))]
        self._first = [ids[-T:] for ids in self.ids]
        capacity = cache_capacity([len(p) for p in self._first], params.max_tokens, T)
        self.decoder = Decoder(model, len(prompts), capacity)
        self._started = False

    def end(self, i: int) -> None:
        self.live[i] = False

    def step(self) -> list[tuple[int, int]]:
        """[(i, token)] for each live sequence, [] once every one has ended."""
        live = np.array(self.live)
        if not live.any():
            return []
        dec = self.decoder
        if not self._started:
            self._started = True
            logits = dec.prefill(self._first)
            rows = {i: logits[i] for i in np.flatnonzero(live)}
        else:
            full = live & (dec.lengths >= dec.capacity)  # these slide (capacity is block_size then)
            step = live & ~full
            rows = {}
            if step.any():
                logits = dec.decode([ids[-1] for ids in self.ids], step)
                rows = {i: logits[i] for i in np.flatnonzero(step)}
            for i in np.flatnonzero(full):
                rows[i] = dec.refill(i, context_window(self.ids[i], self.block_size))
        out = []
        for i in sorted(rows):
            token = choose(rows[i], self.params, self.rngs[i])
            self.ids[i].append(token)
            self.n_new[i] += 1
            if token == self.eos or self.n_new[i] >= self.params.max_tokens:
                self.live[i] = False
            out.append((int(i), token))
        return out


def generate(model, prompt: list[int], n_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int = 0, top_p: float = 1.0, eos: int | None = None) -> list[int]:
    """prompt + up to n_tokens sampled ids (ending at eos, included, when given). temperature 0
    is greedy (argmax)."""
    gen = Generation(model, [prompt], SamplingParams(n_tokens, temperature, top_k, top_p, seed), eos)
    while gen.step():
        pass
    return gen.ids[0]


# --- text ---------------------------------------------------------------------------------------

def eos_token_id(tok) -> int | None:
    """The end-of-text token of a tokenizer: GPT-2's <|endoftext|> where it has one (the bytes
    tokenizer has none)."""
    from crystal.data import EOT

    inner = getattr(tok, "tok", None)
    return None if inner is None else inner.token_to_id(EOT)


class TextStream:
    """The text of one sequence's new tokens, piece by piece: `push(token)` returns the text now
    complete (whole characters: a piece never ends inside a UTF-8 character, so a token that
    does waits for the next), held back while it could still begin a stop text; after a stop
    text, `stopped` and nothing more. `finish()` returns the rest. The pieces joined are the
    decoded tokens, cut before the first stop text."""

    def __init__(self, tok, prompt: list[int], stops: tuple[str, ...] = ()):
        self.tok, self.stops = tok, stops
        self.ids = [int(t) for t in prompt[-STREAM_CONTEXT:]]  # decoded with the new ones: a
        self.prefix = 0  # tokenizer's spacing may depend on the token before
        self.read = len(self.ids)
        self.held = ""  # decoded text that could begin a stop text
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):  # inside a character: wait
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return self._emit(text[len(before):], final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        rest = self.tok.decode(self.ids[self.prefix:])[len(before):]  # an unfinished character, as decode gives it
        self.prefix = self.read = len(self.ids)
        return self._emit(rest, final=True)

    def _emit(self, piece: str, final: bool) -> str:
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.held = True, ""
            return text[:cut]
        # everything before the longest end of `text` that begins some stop text is final
        hold = 0 if final else max((k for s in self.stops for k in range(1, len(s))
                                    if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]


class OrderedPrinter:
    """Samples printed one after another while they are decoded together: sample 0 as its text
    comes, sample i buffered until samples before it are done. Each sample is its head (the
    prompt's text), its text and a newline, then a separator line when there are several."""

    SEPARATOR = "---------------\n"

    def __init__(self, n: int, head: str, write=None):
        self.n, self.head = n, head
        self.write = write or _write_stdout
        self.buffers: list[list[str]] = [[] for _ in range(n)]
        self.done = [False] * n
        self.current = 0
        self.write(head)

    def text(self, i: int, piece: str) -> None:
        if not piece:
            return
        if i == self.current:
            self.write(piece)
        else:
            self.buffers[i].append(piece)

    def end(self, i: int) -> None:
        self.done[i] = True
        while self.current < self.n and self.done[self.current]:
            self.write("\n" + (self.SEPARATOR if self.n > 1 else ""))
            self.current += 1
            if self.current < self.n:
                self.write(self.head + "".join(self.buffers[self.current]))
                self.buffers[self.current].clear()


def _write_stdout(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def sample_text(model, tok, prompt_ids: list[int], params: SamplingParams, n: int = 1, write=None) -> list[str]:
    """`crystal sample`: n samples of the continuation of prompt_ids decoded as one batch and
    printed as they come (OrderedPrinter); returns each sample's new text."""
    if not 1 <= n <= MAX_SAMPLES:
        raise CrystalError(f"--num-samples must be in [1, {MAX_SAMPLES}], got {n}")
    gen = Generation(model, [prompt_ids] * n, params, eos_token_id(tok))
    streams = [TextStream(tok, prompt_ids, params.stop) for _ in range(n)]
    texts = [[] for _ in range(n)]
    printer = OrderedPrinter(n, tok.decode(prompt_ids), write)

    def put(i: int, piece: str) -> None:
        texts[i].append(piece)
        printer.text(i, piece)

    ended = [False] * n
    while True:
        for i, token in gen.step():
            if token != gen.eos:
                put(i, streams[i].push(token))
                if streams[i].stopped:
                    gen.end(i)
        for i in range(n):
            if not gen.live[i] and not ended[i]:
                ended[i] = True
                put(i, streams[i].finish())
                printer.end(i)
        if all(ended):
            return ["".join(t) for t in texts]


def prompt_tokens(tok, text: str) -> list[int]:
    """The prompt's ids (an empty prompt is a newline, as nanoGPT starts)."""
    ids = [int(i) for i in tok.encode(text or "\n")]
    return ids or [int(i) for i in tok.encode("\n")]


"""Generation for Echo, kept outside the model as in openai/whisper (transcription: echo.transcribe).

`generate`: greedy, sampling and beam search on the explicit KV cache (EchoCache; beams reorder it), with
whisper's start sequence (<|startoftranscript|><|lang|><|task|><|notimestamps|>) and its temperature
fallback: a row whose text compresses too well (gzip ratio > 2.4, i.e. repetitive) or whose mean token
log-probability is below -1 is decoded again at the next temperature.
"""

from __future__ import annotations

import math
import operator
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from echo_kernels.optional import require

from .cache import EchoCache
from .inputs import check_mel
from .positional import PositionalState

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass
class Decoded:
    """One row's result: generated tokens (prompt excluded, eot included when reached) and their scores."""

    tokens: list[int]
    sum_logprob: float
    temperature: float = 0.0
    language: str | None = None  # the code its start sequence names (detected or asked for); None without one
    avg_logprob: float = 0.0
    compression_ratio: float | None = None  # of the decoded text; computed only for the temperature fallback


@dataclass
class GenerateOutput:
    """sequences (B, P + n) padded with pad_token_id, and per-row details."""

    sequences: Tensor
    rows: list[Decoded] = field(default_factory=list)


def compression_ratio(text: str) -> float:
    """len(text) / len(gzip(text)) as whisper computes it: high for repetitive text."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def start_tokens(config, language: str | None, task: str | None, prompt=None) -> list[int]:
    """The decoder's start sequence: `prompt` if given; whisper's start sequence on whisper's vocabularies
    (language None is English here: generate() detects it instead); otherwise [decoder_start_token_id],
    where language and task mean nothing and are refused."""
    from .audio import prompt_tokens, uses_whisper_vocab

    check_language(language)
    if prompt is not None:
        prompt = [int(t) for t in (prompt.tolist() if isinstance(prompt, Tensor) else prompt)]
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        return prompt
    if task not in (None, "transcribe", "translate"):
        raise ValueError(f"task must be 'transcribe' or 'translate', got {task!r}")
    if not uses_whisper_vocab(config):
        if language is not None or task is not None:
            raise ValueError(f"language and task tokens need one of whisper's vocabularies; this model has "
                             f"vocab_size = {config.vocab_size}")
        return [config.decoder_start_token_id]
    whisper_tokenizer = require("whisper.tokenizer",
                                "whisper's start tokens (pass prompt= token ids to do without)")
    language = language or "en"
    code = whisper_tokenizer.TO_LANGUAGE_CODE.get(language.lower(), language.lower())
    if code not in whisper_tokenizer.LANGUAGES:
        raise ValueError(f"unknown language {language!r}; expected a code or name whisper knows, "
                         f"e.g. 'en', 'french'")
    if not is_multilingual(config) and (code != "en" or task == "translate"):
        raise ValueError(f"this model's vocabulary ({config.vocab_size} tokens) is English-only: it has no "
                         f"language or task tokens, so language={language!r}, task={task!r} "
                         f"cannot be asked for")
    return prompt_tokens(code, task or "transcribe", vocab_size=config.vocab_size)


def check_language(language) -> None:
    """TypeError unless language is None or a string (start_tokens checks that whisper knows it)."""
    if language is not None and not isinstance(language, str):
        raise TypeError(f"language must be None or a string, a code such as 'en' or a name such as 'french'; "
                        f"got {type(language).__name__}")


def int_at_least(name: str, value, minimum: int) -> int:
    """value as an int (any integer type but bool): TypeError if it is not one, ValueError if below
    `minimum`."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}")
    return number


def _temperatures(temperature) -> tuple[float, ...]:
    """A temperature or a non-empty tuple/list of them -> tuple of finite floats >= 0 (NaN would decode
    greedily without a word, inf would divide every logit into NaN)."""
    values = tuple(temperature) if isinstance(temperature, (tuple, list)) else (temperature,)
    if not values:
        raise ValueError("temperature must be a number >= 0 or a non-empty tuple of them, got ()")
    out = []
    for t in values:
        try:
            if isinstance(t, (str, bytes, bool)):
                raise TypeError
            t = float(t)
        except (TypeError, ValueError):
            raise TypeError(f"temperature must be a number >= 0 (or a tuple of them), got {t!r}") from None
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (or a tuple of them), got "
                             f"{temperature!r}")
        out.append(t)
    return tuple(out)


def end_token(config, eos_token_id: int | None = None) -> int:
    """The id that ends a row: eos_token_id if given, else the config's; checked to be in the vocabulary,
    where a row can emit it (the config may have been changed since it was checked)."""
    from .config import check_token_id

    if eos_token_id is None:
        check_token_id("model.config.eos_token_id", config.eos_token_id, config.vocab_size)
        return config.eos_token_id
    check_token_id("eos_token_id", eos_token_id, config.vocab_size)
    return eos_token_id


def _pad_token(config, pad_token_id: int | None) -> int:
    """The id that fills a row after its end: pad_token_id if given, else the config's; checked to be in the
    vocabulary."""
    from .config import check_token_id

    if pad_token_id is None:
        return config.pad_token_id
    check_token_id("pad_token_id", pad_token_id, config.vocab_size)
    return pad_token_id


def is_multilingual(config) -> bool:
    """whisper's Whisper.isis_multilingual, from the vocabulary size."""
    from .audio import uses_whisper_vocab

    return uses_whisper_vocab(config) and config.vocab_size >= 51865


def detect_language(model, xa: Tensor, audio_mask: Tensor | None) -> tuple[Tensor, list[str]]:
    """xa: (B, Ta, D) encoder output -> (language token ids (B,), language codes): the most likely
    language token after <|startoftranscript|>, as whisper's detect_language picks it."""
    from .audio import get_tokenizer

    tokenizer = get_tokenizer(vocab_size=model.config.vocab_size)
    sot = torch.full((xa.shape[0], 1), tokenizer.sot, dtype=torch.long, device=xa.device)
    logits = model(encoder_outputs=xa, attention_mask=audio_mask, decoder_input_ids=sot).logits[:, 0]
    languages = torch.tensor(tokenizer.all_language_tokens, device=logits.device)
    tokens = languages[logits.index_select(1, languages).argmax(-1)]
    code = dict(zip(tokenizer.all_language_tokens, tokenizer.all_language_codes))
    return tokens, [code[int(t)] for t in tokens]


def logit_filter(config, sample_begin: int, suppress_tokens="-1", suppress_blank: bool = True):
    """whisper's SuppressTokens and SuppressBlank (its DecodingOptions' suppress_tokens and suppress_blank) as
    one function (logits (N, V), tokens so far (N, L)) -> logits.

    suppress_tokens: "-1" (whisper's default: its non-speech symbols), a comma-separated string or a list of
    token ids ("-1" among them adds the non-speech symbols), or None / "" for none; on whisper's vocabularies
    a non-empty list also suppresses <|transcribe|>, <|translate|>, <|startoftranscript|>, <|startofprev|>,
    <|startoflm|> and <|nospeech|>, as whisper does. suppress_blank: " " and <|endoftext|> cannot be the
    first sampled token (position `sample_begin`). On other vocabularies only explicit token ids apply.
    """
    from .audio import get_tokenizer, uses_whisper_vocab

    if isinstance(suppress_tokens, str):
        suppress_tokens = [int(t) for t in suppress_tokens.split(",") if t.strip()]
    ids = set(int(t) for t in (suppress_tokens or ()))
    blank: list[int] = []
    if uses_whisper_vocab(config) and (ids or suppress_blank):
        tokenizer = get_tokenizer(vocab_size=config.vocab_size)
        if -1 in ids:
            ids |= set(tokenizer.non_speech_tokens)
        if ids:
            ids |= {tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev,
                    tokenizer.sot_lm}
            if tokenizer.no_speech is not None:
                ids.add(tokenizer.no_speech)
        if suppress_blank:
            blank = tokenizer.encode(" ") + [tokenizer.eot]
    always = sorted(t for t in ids if t >= 0)
    if any(t >= config.vocab_size for t in always):
        raise ValueError(f"suppress_tokens holds ids outside the vocabulary of {config.vocab_size} tokens")
    def apply(logits: Tensor, tokens: Tensor) -> Tensor:
        if not always and not blank:
            return logits
        logits = logits.clone()
        logits[:, always] = -float("inf")
        if blank and tokens.shape[1] == sample_begin:
            logits[:, blank] = -float("inf")
        return logits

    return apply


class _Stepper:
    """Logits of the next token for every row, through the KV cache or by re-running the whole prefix."""

    def __init__(self, model, xa: Tensor, audio_mask: Tensor | None, use_cache: bool, pos: PositionalState):
        self.model, self.xa, self.audio_mask, self.use_cache = model, xa, audio_mask, use_cache
        # the encoder's positional state: every M is built once per generate call
        self.cache = EchoCache(positions=pos) if use_cache else None

    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens: (N, L) the whole sequence so far -> logits (N, vocab) of its next token."""
        if not self.use_cache:
            return self.model(encoder_outputs=self.xa, attention_mask=self.audio_mask,
                              decoder_input_ids=tokens).logits[:, -1]
        if self.cache.offset == 0:
            out = self.model(encoder_outputs=self.xa, attention_mask=self.audio_mask,
                             decoder_input_ids=tokens, past_key_values=self.cache, use_cache=True)
        else:
            out = self.model(decoder_input_ids=tokens[:, self.cache.offset:], past_key_values=self.cache,
                             use_cache=True)
        return out.logits[:, -1]

    def reorder(self, index: Tensor) -> None:
        self.xa = self.xa.index_select(0, index)
        if self.audio_mask is not None:
            self.audio_mask = self.audio_mask.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)


def _sample_or_greedy(model, xa, mask, prompt: Tensor, max_new: int, temperature: float,
                      generator: torch.Generator | None, use_cache: bool, pos: PositionalState, suppress,
                      eot: int | None = None) -> list[Decoded]:
    config = model.config
    N = prompt.shape[0]
    eot = config.eos_token_id if eot is None else eot
    step = _Stepper(model, xa, mask, use_cache, pos)
    tokens = prompt
    sum_lp = torch.zeros(N, dtype=torch.float64)
    done = torch.zeros(N, dtype=torch.bool)
    lengths = torch.zeros(N, dtype=torch.long)
    for i in range(max_new):
        logits = suppress(step(tokens).float(), tokens)
        logprobs = F.log_softmax(logits, dim=-1)
        if temperature > 0:
            probs = F.softmax(logits / temperature, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done.to(nxt.device), torch.full_like(nxt, config.pad_token_id), nxt)
        picked = logprobs.gather(1, nxt[:, None])[:, 0].double().cpu()
        sum_lp += torch.where(done, 0.0, picked)
        lengths += (~done).long()
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= (nxt == eot).cpu()
        if bool(done.all()):
            break
    gen = tokens[:, prompt.shape[1]:].cpu()
    return [Decoded(gen[n, : int(lengths[n])].tolist(), float(sum_lp[n])) for n in range(N)]


def _beam_search(model, xa, mask, prompt: Tensor, max_new: int, num_beams: int, use_cache: bool,
                 pos: PositionalState, suppress, eot: int | None = None) -> list[Decoded]:
    config = model.config
    N, K = prompt.shape[0], num_beams
    eot, pad = config.eos_token_id if eot is None else eot, config.pad_token_id
    device = prompt.device
    expand = torch.arange(N, device=device).repeat_interleave(K)
    step = _Stepper(model, xa.index_select(0, expand), None if mask is None else mask.index_select(0, expand),
                    use_cache, pos)
    tokens = prompt.index_select(0, expand)  # (N K, P)
    P = prompt.shape[1]
    sum_lp = torch.full((N, K), -float("inf"), dtype=torch.float64)
    sum_lp[:, 0] = 0.0  # the K beams start identical: expand only the first
    finished: list[list[tuple[list[int], float]]] = [[] for _ in range(N)]
    for i in range(max_new):
        logprobs = F.log_softmax(suppress(step(tokens).float(), tokens), dim=-1).double().cpu()  # (N K, V)
        V = logprobs.shape[-1]
        candidates = (sum_lp[:, :, None] + logprobs.view(N, K, V)).view(N, K * V)
        top_scores, top_index = candidates.topk(2 * K, dim=-1)
        src = torch.arange(K).repeat(N, 1)
        new_tok = torch.full((N, K), pad, dtype=torch.long)
        new_sum = sum_lp.clone()
        for n in range(N):
            if len(finished[n]) >= K:
                continue  # this row is done: its beams idle on pad
            alive = 0
            for score, index in zip(top_scores[n].tolist(), top_index[n].tolist()):
                if score == -float("inf"):
                    break
                beam, token = divmod(index, V)
                if token == eot:
                    if len(finished[n]) < K:
                        seq = tokens[n * K + beam, P:].tolist() + [eot]
                        finished[n].append((seq, score))
                    continue
                src[n, alive], new_tok[n, alive], new_sum[n, alive] = beam, token, score
                alive += 1
                if alive == K:
                    break
            for k in range(alive, K):  # fewer than K live candidates: the rest are dead beams
                new_sum[n, k] = -float("inf")
        index = (torch.arange(N)[:, None] * K + src).view(-1).to(device)
        tokens = torch.cat([tokens.index_select(0, index), new_tok.view(-1, 1).to(device)], dim=1)
        step.reorder(index)
        sum_lp = new_sum
        if all(len(f) >= K for f in finished):
            break
    out = []
    for n in range(N):
        hyps = list(finished[n])
        if len(hyps) < K:  # ran out of length: the live beams count too
            for k in range(K):
                if sum_lp[n, k] > -float("inf"):
                    hyps.append((tokens[n * K + k, P:].tolist(), float(sum_lp[n, k])))
        seq, score = max(hyps, key=lambda h: h[1] / max(1, len(h[0])))
        out.append(Decoded(seq, score))
    return out


@torch.no_grad()
def generate(model, input_features: Tensor, attention_mask: Tensor | None = None,
             max_new_tokens: int | None = None, num_beams: int = 1,
             temperature: float | tuple[float, ...] = 0.0, language: str | None = None,
             task: str | None = None, prompt=None, use_cache: bool = True,
             compression_ratio_threshold: float | None = 2.4, logprob_threshold: float | None = -1.0,
             suppress_tokens="-1", suppress_blank: bool = True, seed: int = 0,
             return_dict_in_generate: bool = False, eos_token_id: int | None = None,
             pad_token_id: int | None = None, **unused):
    """mel (B, n_mels, T) -> token ids (B, P + n): the start sequence, then at most max_new_tokens tokens
    (default n_text_ctx // 2, whisper's sample_len), then pad_token_id after each row's <|endoftext|>.

    num_beams > 1 is beam search at temperature 0 (score: sum log-probability / length, as whisper);
    temperature > 0 samples (seeded by `seed`, so results repeat). A tuple of temperatures is whisper's
    fallback: rows whose result fails the thresholds are decoded again at the next one. On whisper's
    vocabularies, language (code or name) and task ("transcribe" or "translate") pick whisper's start tokens;
    language=None detects each row's language as whisper does (English-only vocabularies have no language
    tokens). suppress_tokens and suppress_blank are whisper's (see logit_filter). `prompt` (token ids)
    replaces the start sequence. use_cache=False re-runs the decoder on the whole prefix at each step (same
    tokens). eos_token_id (default: the config's) ends a row; pad_token_id (default: the config's) fills the
    rows after their end (the speech-recognition pipeline passes its tokenizer's). A temperature must be
    finite and >= 0, max_new_tokens an int >= 0 and language a string: anything else is a TypeError or
    ValueError naming it.

    openai-whisper (the speech extra) is needed for whisper's start tokens, its suppression lists and for
    judging text in the temperature fallback: with a `prompt`, one temperature, suppress_tokens=None and
    suppress_blank=False, generate needs no optional package.
    """
    from .audio import uses_whisper_vocab

    config = model.config
    unused.pop("labels", None)
    unused = {k: v for k, v in unused.items()
              if v is not None and k not in ("synced_gpus", "generation_config")}
    if unused:
        raise TypeError(f"generate() got unexpected arguments: {sorted(unused)}")
    check_mel(config, input_features, attention_mask)
    num_beams = int_at_least("num_beams", num_beams, 1)
    temperatures = _temperatures(temperature)
    eot = end_token(config, eos_token_id)
    pad = _pad_token(config, pad_token_id)
    start = start_tokens(config, language, task, prompt)
    detect = prompt is None and language is None and is_multilingual(config)
    suppress = logit_filter(config, len(start), suppress_tokens, suppress_blank)
    # The text (hence the tokenizer) is needed only to judge a row for the temperature fallback.
    judge_text = compression_ratio_threshold is not None and len(temperatures) > 1
    room = config.n_text_ctx - len(start)
    if room < 1:
        raise ValueError(f"the start sequence ({len(start)} tokens) leaves no room in n_text_ctx = "
                         f"{config.n_text_ctx}")
    max_new = (min(room, config.n_text_ctx // 2) if max_new_tokens is None
               else min(int_at_least("max_new_tokens", max_new_tokens, 0), room))
    was_training = model.training
    model.eval()
    device = input_features.device
    B = input_features.shape[0]
    try:
        pos = model.positional_state()
        xa, _ = model.encode(input_features, attention_mask, pos)
        starts = torch.tensor([start] * B, dtype=torch.long, device=device)
        languages = [None] * B
        # whisper's start sequence is <|startoftranscript|> <|lang|> ...: write each row's language
        if detect:
            starts[:, 1], languages = detect_language(model, xa, attention_mask)
        elif uses_whisper_vocab(config) and prompt is None:
            languages = [start_language(language)] * B
        results: list[Decoded | None] = [None] * B
        pending = list(range(B))
        generator = torch.Generator().manual_seed(seed)
        for t_index, t in enumerate(temperatures):
            rows = torch.tensor(pending, device=device)
            sub_xa = xa.index_select(0, rows)
            sub_mask = None if attention_mask is None else attention_mask.index_select(0, rows)
            prompt_ids = starts.index_select(0, rows)
            if max_new == 0:
                decoded = [Decoded([], 0.0) for _ in pending]
            elif t == 0 and num_beams > 1:
                decoded = _beam_search(model, sub_xa, sub_mask, prompt_ids, max_new, num_beams, use_cache,
                                       pos, suppress, eot)
            else:
                decoded = _sample_or_greedy(model, sub_xa, sub_mask, prompt_ids, max_new, t, generator,
                                            use_cache, pos, suppress, eot)
            last = t_index == len(temperatures) - 1
            still = []
            for row, d in zip(pending, decoded):
                d.temperature = t
                d.language = languages[row]
                d.avg_logprob = d.sum_logprob / (len(d.tokens) + 1)
                if judge_text:
                    d.compression_ratio = compression_ratio(tokens_text(config, d.tokens, eot))
                failed = ((judge_text and d.compression_ratio > compression_ratio_threshold)
                          or (logprob_threshold is not None and d.avg_logprob < logprob_threshold))
                if failed and not last:
                    still.append(row)
                else:
                    results[row] = d
            pending = still
            if not pending:
                break
    finally:
        model.train(was_training)
    P = len(start)
    sequences = torch.full((B, P + max(len(d.tokens) for d in results)), pad, dtype=torch.long)
    sequences[:, :P] = starts.cpu()
    for b, d in enumerate(results):
        sequences[b, P: P + len(d.tokens)] = torch.tensor(d.tokens, dtype=torch.long)
    sequences = sequences.to(device)
    return GenerateOutput(sequences, results) if return_dict_in_generate else sequences


def start_language(language: str | None) -> str:
    """The language code the start sequence names for `language` (None: English)."""
    to_code = require("whisper.tokenizer", "whisper's language codes").TO_LANGUAGE_CODE
    language = (language or "en").lower()
    return to_code.get(language, language)


def tokens_text(config, tokens: list[int], eot: int) -> str:
    """The text of a row's tokens: whisper's tokenizer on whisper's vocabularies, else the ids but eot."""
    from .audio import decode_text, uses_whisper_vocab

    if uses_whisper_vocab(config):
        return decode_text(tokens, config.vocab_size)
    return " ".join(str(t) for t in tokens if t != eot)

"""The models behind the service: one pipeline per model folder, LoRA characters sharing their base's.

A LoRA character's adapters are loaded into its base's pipeline once, at start-up, under names of their own, and
switched per batch (`set_adapters` with the character's weights; `disable_lora` for a character without LoRAs), so
ten LoRA characters on one base hold one base in memory. Two LoRAs that bring the same new token (two characters
trained as `<sks>`) cannot share a tokenizer: the second gets its own copy of the base, with a note.

Prompts are measured with the slot's own copies of the pipeline's tokenizers (`TokenCounter`), never with the
pipeline's: a tokenizer call sets state that the next call reads, and the pipeline is the worker thread's alone.
What a model reads of a prompt is its family's (characters.compiler.family_budget): CLIP's 77 tokens for SD and
SDXL; for Flux.1 and SD3 T5's max_sequence_length for the whole prompt, and CLIP's 77 for the identity.

A render request whose fragments all weigh 1.0 is drawn from its prompt text, exactly as `dreambooth generate`
draws that prompt; weighted fragments (an emotion's intensity) become weighted embeddings, compel's weighting applied
to every text encoder the family's pipeline reads, T5 included (`WEIGHTED`, one function per family, at the end).
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth.characters.character import Character, family_defaults
from dreambooth.characters.compiler import Budget, RenderRequest, family_budget, token_counter, token_limit
from dreambooth.errors import UserError
from dreambooth.formats.lora import find_lora_file, new_tokens, token_file_for
from dreambooth.formats.lora_fit import check_lora_fits
from dreambooth.formats.lora_loading import load_lora_adapter
from dreambooth.generate import GenerationSettings, png_info
from dreambooth.models.base import model_identity
from dreambooth.models.families import FAMILIES, Family, pipeline_family
from dreambooth.models.loading import load_pipeline, make_scheduler, pick_device, pick_dtype
from dreambooth.serving.service import TextRules


class TokenCounter:
    """A prompt's tokens as some of a pipeline's tokenizers count them (the most of SDXL's two CLIPs; Flux's or SD3's
    T5; their CLIPs, for the identity), on copies of its own.

    A transformers tokenizer keeps padding and truncation on its backend between calls, and every call sets them:
    counting with the pipeline's tokenizer (truncation off, no padding) from a request thread, while the worker thread
    was between setting them and encoding, gave the worker's negative prompt 2 tokens against the prompt's 77, and
    torch.cat failed ("Expected size 2 but got size 77"; ~2% of renders under /v1/compile + /v1/render load). The
    copies are shared by the request threads (sync endpoints run in a thread pool), so calls take turns."""

    def __init__(self, tokenizers: list, limit: int | None = None):
        self.tokenizers = [copy.deepcopy(tokenizer) for tokenizer in tokenizers]
        self.counters = [token_counter(tokenizer) for tokenizer in self.tokenizers]
        self.limit = limit if limit is not None else min(token_limit(tokenizer) for tokenizer in self.tokenizers)
        self._lock = threading.Lock()

    def __call__(self, text: str) -> int:
        with self._lock:
            return max(count(text) for count in self.counters)


@dataclass
class Slot:
    """A pipeline and what is loaded into it; the pipeline, its schedulers and compel are the worker thread's."""

    pipe: object
    model: str
    family: Family
    tokens: set[str] = field(default_factory=set)
    adapters: bool = False
    schedulers: dict = field(default_factory=dict)
    weighting: dict = field(default_factory=dict)  # what the weighted embeddings keep between batches (compel)
    budget: Budget | None = None
    # the request threads' tokenizers, copied once every LoRA is loaded: the whole prompt's, and where those are
    # T5's, the identity's (CLIP's)
    counter: TokenCounter | None = None
    identity: TokenCounter | None = None
    negative_prompt: bool = True  # whether its pipeline draws with a negative prompt (Flux.1's does not)
    active: tuple | None = None  # the adapters and weights set now (None: none set yet)

    def call_kwargs(self) -> dict:
        """What every call of its pipeline passes beside the prompt: T5's length, where it has T5, so that the
        length prompts were measured against is the one they are drawn with (Flux.1 schnell: 256, not
        FluxPipeline's 512)."""
        length = self.budget.sequence_length
        return {} if length is None else {"max_sequence_length": length}


@dataclass
class Drawn:
    character: Character
    slot: Slot
    adapters: list[str]
    weights: list[float]
    model_hash: str
    loaded: bool = True  # its LoRAs are in its pipeline (a lazy renderer loads them on its first draw)


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def character_model_hash(character: Character) -> str:
    """What the character's pictures depend on: the model's identity (its weight files' headers, first MiB and
    sizes, and their modification times, so that a model saved again is a new model) and the LoRA files' contents."""
    digest = hashlib.sha256(model_identity(character.model).encode())
    folder = Path(character.model)
    for file in sorted(folder.glob("*/*.safetensors")) if folder.is_dir() else []:
        digest.update(f"{file.relative_to(folder)}:{file.stat().st_mtime_ns}".encode())
    for lora in character.loras:
        file = find_lora_file(lora.file)
        digest.update(f"{_file_hash(file)}:{lora.weight!r}".encode())
        tokens = token_file_for(file)  # beside the LoRA, named after it unless it has diffusers' fixed name
        if tokens.is_file():
            digest.update(_file_hash(tokens).encode())
    return digest.hexdigest()[:16]


class Renderer:
    """Loads every character's model once; `render` draws a batch of requests for one character and size."""

    def __init__(self, characters: dict[str, Character], *, device: str | None = None, precision: str | None = None,
                 lazy_loras: bool = False):
        """`lazy_loras`: a LoRA character's adapters are loaded on its first draw (or `hold`) rather than now, and
        `release` unloads them: serve --ray's replicas, each of which draws the characters routed to it."""
        self.lazy_loras = lazy_loras
        self.device = pick_device(device)
        self.dtype = pick_dtype(precision, self.device)
        self.slots: list[Slot] = []
        self.drawn: dict[str, Drawn] = {}
        self.calls = 0  # pipeline calls, for tests and metrics
        # times a pipeline's active LoRAs changed between batches: what routing a character's requests to the replica
        # that last drew it saves (serve --ray's model multiplexing), counted in /metrics
        self.lora_switches = 0
        self._lock = threading.Lock()
        for character in characters.values():  # every LoRA made for another model, before any model loads
            for lora in character.loras:
                check_lora_fits(find_lora_file(lora.file), character.model, f"character {character.name}'s model:")
        for character in characters.values():
            self.drawn[character.name] = self._place(character)
        for slot in self.slots:  # after the LoRAs, whose new tokens the copies must know
            self._count_tokens(slot)
        self._problems = {name: self._prepare_scheduler(drawn) for name, drawn in self.drawn.items()}

    # ------------------------------------------------------------------------------------------------ loading
    @staticmethod
    def _count_tokens(slot: Slot) -> None:
        """The slot's budget and its counters, on copies of its tokenizers as they are now (new tokens included)."""
        tokenizers = {t.tokenizer: getattr(slot.pipe, t.tokenizer, None) for t in slot.family.text_encoders}
        slot.budget = family_budget(slot.family, tokenizers)
        slot.counter = TokenCounter(list(slot.budget.prompt), slot.budget.limit)
        if slot.budget.identity:
            slot.identity = TokenCounter(list(slot.budget.identity), slot.budget.identity_limit)

    def _new_slot(self, model: str) -> Slot:
        pipe = load_pipeline(model, device=self.device, dtype=self.dtype)
        family = pipeline_family(pipe) or FAMILIES["sd1"]
        slot = Slot(pipe=pipe, model=model, family=family, tokens=set(pipe.tokenizer.get_vocab()),
                    negative_prompt=takes_negative_prompt(family))
        slot.schedulers["__base__"] = dict(pipe.scheduler.config)
        self.slots.append(slot)
        return slot

    def _place(self, character: Character) -> Drawn:
        files = [find_lora_file(lora.file) for lora in character.loras]
        wanted = {token for file in files for token in new_tokens(file)}
        slot = next((s for s in self.slots if s.model == character.model and not (wanted & s.tokens)), None)
        if slot is None:
            if any(s.model == character.model for s in self.slots):
                print(f"note: character {character.name}'s LoRA brings token(s) {', '.join(sorted(wanted))} that "
                      f"another character's LoRA on {character.model} brings too; it gets its own copy of the model.")
            slot = self._new_slot(character.model)
        names = [f"{character.name.replace('-', '_')}_{i}" for i in range(len(character.loras))]
        slot.tokens |= wanted
        drawn = Drawn(character, slot, names, [lora.weight for lora in character.loras],
                      character_model_hash(character), loaded=not names)
        if not self.lazy_loras:
            self._load(drawn)
        return drawn

    def _load(self, drawn: Drawn) -> None:
        """The character's LoRAs into its pipeline, as named adapters (the caller holds the pipeline)."""
        character, slot = drawn.character, drawn.slot
        for name, lora in zip(drawn.adapters, character.loras):
            load_lora_adapter(slot.pipe, lora.file, name, model=character.model,
                              flag=f"character {character.name}'s model:")
        drawn.loaded = True
        slot.adapters = slot.adapters or bool(drawn.adapters)

    def hold(self, name: str) -> None:
        """Loads the character's LoRAs now if they are not loaded (a lazy renderer's replica, on being routed it)."""
        drawn = self.drawn[name]
        with self._lock:
            if not drawn.loaded:
                self._load(drawn)
                self._count_tokens(drawn.slot)

    def release(self, name: str) -> None:
        """Unloads the character's LoRAs (a replica that stops being routed it); its next draw loads them again."""
        drawn = self.drawn[name]
        with self._lock:
            if drawn.loaded and drawn.adapters:
                drawn.slot.pipe.delete_adapters(drawn.adapters)
                drawn.slot.active = None
                drawn.loaded = False

    @property
    def loras_loaded(self) -> int:
        """LoRA characters whose adapters are in a pipeline now."""
        return sum(d.loaded and bool(d.adapters) for d in self.drawn.values())

    def _prepare_scheduler(self, drawn: Drawn) -> list[str]:
        """The character's sampler, built now rather than on its first draw: a class name diffusers lacks passes the
        characters file's check (it ends in Scheduler) and failed every render with a 500."""
        name, slot = drawn.character.scheduler, drawn.slot
        try:
            if name not in slot.schedulers:
                slot.schedulers[name] = make_scheduler(name, slot.schedulers["__base__"])
        except UserError as e:
            return [f"its scheduler: {e}"]
        return []

    def unusable(self, name: str) -> list[str]:
        """What loading found that the character cannot be drawn with (empty when it can)."""
        return self._problems[name]

    # ------------------------------------------------------------------------------------------------ drawing
    def count_tokens(self, name: str) -> TokenCounter:
        """The counter of the character's prompts, for any thread but the worker (whose pipeline it never touches)."""
        return self.drawn[name].slot.counter

    def max_tokens(self, name: str) -> int:
        return self.drawn[name].slot.counter.limit

    def text_rules(self, name: str) -> TextRules:
        """What the character's model reads of a prompt and how it draws (service.TextRules)."""
        slot = self.drawn[name].slot
        identity = slot.identity
        return TextRules(count=slot.counter, limit=slot.counter.limit, encoder=slot.budget.encoder,
                         count_identity=identity, identity_limit=identity.limit if identity else None,
                         family=slot.family.title, negative_prompt=slot.negative_prompt,
                         side_multiple=slot.family.side_multiple)

    def draw_defaults(self, name: str) -> dict:
        """The steps, guidance and sampler of the character's model's family, as its loaded pipeline says
        (characters.character.family_defaults)."""
        slot = self.drawn[name].slot
        return family_defaults(slot.family, slot.pipe)

    def model_hash(self, name: str) -> str:
        return self.drawn[name].model_hash

    def model_family(self, name: str) -> tuple[str, int]:
        """The family of the character's model and the side its pipeline draws when not told, in pixels (SD 1.x 512,
        SD 2.x 768 or 512, SDXL, Flux and SD3 1024): its default sample size (the denoiser's, where the pipeline
        keeps none) times the VAE's downscaling."""
        slot = self.drawn[name].slot
        pipe = slot.pipe
        sample = getattr(pipe, "default_sample_size", None)
        if sample is None:
            sample = getattr(pipe, slot.family.denoiser).config.sample_size
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return slot.family.title, int(sample) * int(pipe.vae_scale_factor)

    def _activate(self, drawn: Drawn, scheduler: str) -> None:
        slot, pipe = drawn.slot, drawn.slot.pipe
        if slot.adapters:
            active = (tuple(drawn.adapters), tuple(drawn.weights))
            if active != slot.active:
                self.lora_switches += 1
            slot.active = active
            if drawn.adapters:
                pipe.enable_lora()
                pipe.set_adapters(drawn.adapters, adapter_weights=drawn.weights)
            else:
                pipe.disable_lora()
        if scheduler not in slot.schedulers:
            slot.schedulers[scheduler] = make_scheduler(scheduler, slot.schedulers["__base__"])
        pipe.scheduler = slot.schedulers[scheduler]

    def render(self, requests: list[RenderRequest]) -> list[bytes]:
        """PNGs of a batch of requests that share character, size, steps, guidance and sampler; one pipeline call."""
        import torch

        first = requests[0]
        drawn = self.drawn[first.character]
        slot = drawn.slot
        pipe = slot.pipe
        generators = [torch.Generator(device=pipe.device).manual_seed(r.seed) for r in requests]
        shared = dict(num_inference_steps=first.steps, guidance_scale=first.guidance, height=first.height,
                      width=first.width, generator=generators, **slot.call_kwargs())
        with self._lock:
            if not drawn.loaded:  # a lazy renderer's first draw of the character, outside inference mode (peft
                self._load(drawn)  # makes its layers' weights as ordinary tensors)
                self._count_tokens(slot)
            with torch.inference_mode():
                self._activate(drawn, first.scheduler)
                if any(part["weight"] != 1.0 for r in requests for part in r.fragments):
                    weighted = WEIGHTED.get(slot.family.name, WEIGHTED["sd1"])
                    out = pipe(**weighted(pipe, requests, slot.weighting, self.device, slot.budget.sequence_length),
                               **shared)
                else:
                    # Flux.1 takes no negative prompt (a character or request with one is refused before it gets here)
                    negative = ({"negative_prompt": [r.negative_prompt for r in requests]} if slot.negative_prompt
                                else {})
                    out = pipe(prompt=[r.prompt for r in requests], **negative, **shared)
                self.calls += 1
        return [self._png(image, request, drawn) for image, request in zip(out.images, requests)]

    @staticmethod
    def _png(image, request: RenderRequest, drawn: Drawn) -> bytes:
        """The picture with how it was made (A1111's `parameters` and our JSON); the model by character and hash,
        not by the server's paths."""
        meta = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed,
                "steps": request.steps, "guidance": request.guidance, "scheduler": request.scheduler,
                "width": image.width, "height": image.height, "character": request.character,
                "fragments": request.fragments}
        loras = [[Path(lora.file).name, lora.weight] for lora in drawn.character.loras]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=png_info(meta, f"{request.character} ({drawn.model_hash})", loras))
        return buffer.getvalue()


def takes_negative_prompt(family: Family) -> bool:
    """Whether the family's pipeline draws with a negative prompt, as its behaviour's check of generation settings
    says (Flux.1, guidance-distilled, refuses one: its pipeline would ignore it)."""
    try:
        family.behaviour().check_drawing(GenerationSettings(prompts=[], negative_prompt="a negative prompt"))
    except UserError:
        return False
    return True


# -------------------------------------------------------------------------------------- weighted fragments
# A batch's weighted fragments (an emotion's intensity) as the embeddings each family's pipeline takes.
#
# The weighting is compel's (Compel 2.x, `EmbeddingsProvider.get_embeddings_for_weighted_prompt_fragments`): a
# fragment's tokens' hidden states are moved from the empty prompt's by its weight, `empty + (z - empty) * w`, and
# a fragment weighted under 1 also blends the prompt towards itself encoded with the fragment masked out of attention,
# by `tan((1 - w) * pi / 2)` against the prompt's 1 (so that a weight near 0 nearly removes it). SD 1.x/2.x and SDXL go
# through compel itself, which takes the fragments as (text, weight) pairs and reads CLIP.
#
# Flux.1 and SD3 read the prompt through T5 as well, and compel 2.5 has no SD3 wrapper; its Flux one (`CompelForFlux`)
# tokenizes each fragment alone, and SentencePiece then starts each with a word boundary of its own (`, happy` alone is
# `▁ , ▁happy`, within the prompt `, ▁happy`), so weights of 1.0 would not give the prompt's own tokens. Here every
# encoder reads the prompt as its pipeline tokenizes it (same padding, same length), each token takes the weight of the
# fragment its characters belong to (the joiner before a fragment is the fragment's, as compel is given it on the CLIP
# families), and compel's own `build_weighted_embedding_tensor` and `apply_embedding_weights` do the maths. The pooled
# embeddings are the plain prompt's, as for SDXL: CLIP's pooled output is one vector for the whole prompt (compel does
# not weight it either).

def fragment_spans(request: RenderRequest) -> list[tuple[int, int, float]]:
    """(start, end, weight) of each fragment's characters in the prompt, the joiner before it included."""
    spans, at = [], 0
    for i, part in enumerate(request.fragments):
        start = at - (len(request.joiner) if i else 0)
        at += (len(request.joiner) if i else 0) + len(part["text"])
        spans.append((start, at, float(part["weight"])))
    return spans


def token_owners(offsets: list, special: list, spans: list[tuple[int, int, float]]) -> list[int | None]:
    """The fragment each token's characters belong to (None: the start, end and padding tokens)."""
    owners = []
    for (start, _), is_special in zip(offsets, special):
        owner = None if is_special else next((i for i, (a, b, _) in enumerate(spans) if a <= start < b), None)
        owners.append(owner)
    return owners


def weighted_states(tokenizer, encoder, returned, request: RenderRequest, length: int, device):
    """One prompt's hidden states, (1, length, width), with each fragment at its weight: compel's maths on the tokens
    the pipeline gives the encoder (`returned`: compel's ReturnedEmbeddingsType of the states the pipeline takes)."""
    import torch
    from compel import EmbeddingsProvider

    provider = EmbeddingsProvider(tokenizer=tokenizer, text_encoder=encoder, returned_embeddings_type=returned,
                                  truncate=True, device=str(device), model_max_length=length)
    tokens = tokenizer(request.prompt, padding="max_length", max_length=length, truncation=True,
                       return_offsets_mapping=True, return_special_tokens_mask=True)
    spans = fragment_spans(request)
    owners = token_owners(tokens.offset_mapping, tokens.special_tokens_mask, spans)
    ids = torch.tensor(tokens.input_ids, dtype=torch.long, device=device)
    weights = torch.tensor([1.0 if o is None else spans[o][2] for o in owners], dtype=torch.float32, device=device)
    mask = torch.ones_like(ids)
    states = [provider.build_weighted_embedding_tensor(ids, weights, mask, device=device)]
    blend = [1.0]
    for i, (_, _, weight) in enumerate(spans):
        if weight < 1.0:
            without = mask.clone()
            without[torch.tensor([o == i for o in owners], device=device)] = 0
            states.append(provider.build_weighted_embedding_tensor(ids, weights, without, device=device))
            blend.append(math.tan((1.0 - max(weight, 1e-5)) * math.pi / 2))
    stacked = torch.stack(states, dim=1)  # (1, k, length, width)
    return provider.apply_embedding_weights(stacked, blend, normalize=True)


# ------------------------------------------------------------------------------------------------ per family
def sd_embeddings(pipe, requests: list[RenderRequest], cache: dict, device, sequence_length) -> dict:
    """SD 1.x/2.x: compel over the CLIP encoder's last hidden states; the negative prompts as the pipeline encodes
    them."""
    import torch
    from compel import Compel
    from compel.prompt_parser import FlattenedPrompt

    if "compel" not in cache:
        cache["compel"] = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                                 truncate_long_prompts=True, device=str(device))
    embeds = [cache["compel"].build_conditioning_tensor_for_prompt_object(FlattenedPrompt(_pairs(r)))[0][0]
              for r in requests]
    encoded = pipe.encode_prompt(prompt=[r.prompt for r in requests], device=pipe.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=requests[0].guidance > 1.0,
                                 negative_prompt=[r.negative_prompt for r in requests])
    return {"prompt_embeds": torch.cat(embeds).to(pipe.dtype), "negative_prompt_embeds": encoded[1]}


def sdxl_embeddings(pipe, requests: list[RenderRequest], cache: dict, device, sequence_length) -> dict:
    """SDXL: compel over both encoders' penultimate hidden states side by side, and the second's pooled output of
    the plain prompt, as its pipeline's encode_prompt builds them."""
    import torch
    from compel import Compel, ReturnedEmbeddingsType
    from compel.prompt_parser import FlattenedPrompt

    if "compel" not in cache:
        cache["compel"] = Compel(tokenizer=[pipe.tokenizer, pipe.tokenizer_2],
                                 text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
                                 returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                                 requires_pooled=[False, True], truncate_long_prompts=True, device=str(device))
    compel = cache["compel"]
    embeds = [compel.build_conditioning_tensor_for_prompt_object(FlattenedPrompt(_pairs(r)))[0][0] for r in requests]
    pooled = [compel.conditioning_provider.get_pooled_embeddings([r.prompt], device=str(device)) for r in requests]
    encoded = pipe.encode_prompt(prompt=[r.prompt for r in requests], device=pipe.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=requests[0].guidance > 1.0,
                                 negative_prompt=[r.negative_prompt for r in requests])
    return {"prompt_embeds": torch.cat(embeds).to(pipe.dtype), "negative_prompt_embeds": encoded[1],
            "pooled_prompt_embeds": torch.cat(pooled).to(pipe.dtype), "negative_pooled_prompt_embeds": encoded[3]}


def flux_embeddings(pipe, requests: list[RenderRequest], cache: dict, device, sequence_length: int) -> dict:
    """Flux.1: T5's hidden states weighted (they are all the per-token conditioning it has), CLIP's pooled embedding
    of the plain prompt."""
    import torch
    from compel import ReturnedEmbeddingsType

    last = ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED  # T5's last hidden state, as FluxPipeline takes it
    embeds = [weighted_states(pipe.tokenizer_2, pipe.text_encoder_2, last, r, sequence_length, device)
              for r in requests]
    _, pooled, _ = pipe.encode_prompt(prompt=[r.prompt for r in requests], prompt_2=None, device=pipe.device,
                                      max_sequence_length=sequence_length)
    return {"prompt_embeds": torch.cat(embeds).to(pipe.dtype), "pooled_prompt_embeds": pooled}


def sd3_embeddings(pipe, requests: list[RenderRequest], cache: dict, device, sequence_length: int) -> dict:
    """SD3: both CLIPs' penultimate hidden states side by side, padded to T5's width, then T5's, each weighted, as
    StableDiffusion3Pipeline.encode_prompt lays them out; the pooled embeddings of the plain prompt and the negative
    prompts as it encodes them."""
    import torch
    from compel import ReturnedEmbeddingsType

    penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED  # its clip_skip=None
    last = ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
    encoded = pipe.encode_prompt(prompt=[r.prompt for r in requests], prompt_2=None, prompt_3=None,
                                 device=pipe.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=requests[0].guidance > 1.0,
                                 negative_prompt=[r.negative_prompt for r in requests],
                                 max_sequence_length=sequence_length)
    embeds = []
    for i, request in enumerate(requests):
        clip = torch.cat([weighted_states(tokenizer, encoder, penultimate, request, pipe.tokenizer_max_length, device)
                          for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder),
                                                     (pipe.tokenizer_2, pipe.text_encoder_2))], dim=-1)
        if pipe.text_encoder_3 is not None:
            t5 = weighted_states(pipe.tokenizer_3, pipe.text_encoder_3, last, request, sequence_length, device)
        else:  # loaded without T5: the pipeline's zeros
            t5 = encoded[0][i:i + 1, clip.shape[1]:].to(clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds.append(torch.cat([clip, t5.to(clip.device)], dim=-2))
    return {"prompt_embeds": torch.cat(embeds).to(pipe.dtype), "negative_prompt_embeds": encoded[1],
            "pooled_prompt_embeds": encoded[2], "negative_pooled_prompt_embeds": encoded[3]}


def _pairs(request: RenderRequest) -> list[tuple[str, float]]:
    """The prompt's (text, weight) pairs for compel: its own text, split where the compiler joined it, so that weights
    of 1.0 would give the plain prompt's tokens (CLIP splits words at spaces and punctuation alike)."""
    return [(part["text"] if i == 0 else request.joiner + part["text"], float(part["weight"]))
            for i, part in enumerate(request.fragments)]


WEIGHTED = {"sd1": sd_embeddings, "sd2": sd_embeddings, "sdxl": sdxl_embeddings, "flux": flux_embeddings,
            "sd3": sd3_embeddings}

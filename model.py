"""
The compact generator transformer: one GPT-style model with two modes over residual-VQ codes.

    ar       causal; the class embedding is the first input and the output at input slot t
             predicts token t (so T outputs for T tokens); sampling with a KV cache.
    maskgit  bidirectional; a learned [MASK] token replaces the masked codes, the class token is
             a prefix; training masks a schedule-drawn fraction per sample and only masked
             positions count (paper Eq. 3 / 15); sampling by confidence-ordered unmasking.

Tokens are the tokenizer's codes of shape (h, w, L), flattened position-major, level-minor:
token t sits at spatial position t // L and RQ level t % L, so T = h * w * L. Every slot gets a
learned spatial embedding (h * w of them) and a per-level embedding (L of them, as CODA does);
the token table is shared by all levels (the level embedding tells them apart). With
`level_vocab` (K_1, .., K_L) the levels are instead the sub-tokens of one implicit code (LFQ /
FSQ), each with its own vocabulary and head: support/factorized.py's FactorizedGPT, built on the
hooks `embed`, `level_head` and `_draw_masked` below.

Class conditioning uses a learned null class (id `num_classes`) for classifier-free guidance:
in training, labels are replaced by the null class with probability `class_dropout`; at sampling,
cond and uncond rows go through one batched forward and logits = u + cfg_scale * (c - u).

The loss (SNCE, Eq. 8; CE when q is one-hot) is fused with the output head, so train.py never
holds (B, T, K) logits: it takes the hidden states and the head's weight,

    hidden = model.forward_hidden(codes, labels, mask)                     # (B, T, n_embd)
    loss = fused_linear_snce(hidden, model.head.weight, latents, codebook, tau,
                             bias=model.head.bias, mask=mask)              # mask None for ar
    # under DDP: hidden = ddp_model(codes, labels, mask, return_hidden=True)
    # maskgit: mask = model.sample_mask(B)  (True = masked = counted); ar: mask = None

Usage (a CPU smoke test; normally train.py / sample.py drive this file):

    from model import GPT, GPTConfig, MODELS
    cfg = GPTConfig(mode="ar", vocab_size=512, levels=2, grid_h=7, grid_w=7, num_classes=10,
                    **MODELS["tiny"])
    model = GPT(cfg)
    codes = model.generate(torch.arange(4), cfg_scale=2.0, top_k=50)      # (4, 7, 7, 2)
    GPT(GPTConfig(**dataclasses.asdict(cfg)))   # what checkpoints store: a plain dict
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.model_checks import checked_labels, flat_codes, flat_mask
from support.sampling import cfg_combine, gumbel_noise, sample_logits

MODES = ("ar", "maskgit")
MASK_SCHEDULES = ("cosine", "arccos")


@dataclass
class GPTConfig:
    mode: str = "ar"  # 'ar' (causal, KV-cache sampling) or 'maskgit' (bidirectional, [MASK] token)
    vocab_size: int = 1024  # K: codes per level (all levels share one K-way head)
    levels: int = 1  # L: residual-VQ depth; T = grid_h * grid_w * levels
    grid_h: int = 8  # latent grid height h
    grid_w: int = 8  # latent grid width w
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    num_classes: int = 10  # 0 = unconditional (only the null class exists)
    class_dropout: float = 0.1  # P(label -> null class) in training, for CFG
    dropout: float = 0.0
    bias: bool = False  # biases in Linear / LayerNorm layers, including the head
    mask_schedule: str = "cosine"  # maskgit: 'cosine' or 'arccos' fraction-masked schedule
    # per-level vocabularies (K_1, .., K_L), each <= vocab_size: the L levels are sub-tokens of
    # one implicit code with a head each (support/factorized.py); () = one K-way head for all
    level_vocab: tuple = ()

    def __post_init__(self):
        def bad(what, val):
            raise ValueError(f"GPTConfig.{what}: expected {val}")

        if self.mode not in MODES:
            bad("mode", f"one of {MODES}, got {self.mode!r}")
        if self.mask_schedule not in MASK_SCHEDULES:
            bad("mask_schedule", f"one of {MASK_SCHEDULES}, got {self.mask_schedule!r}")
        for f in ("vocab_size", "levels", "grid_h", "grid_w", "n_layer", "n_head", "n_embd"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f, f"a positive int, got {v!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            bad("num_classes", f"an int >= 0, got {self.num_classes!r}")
        if self.n_embd % self.n_head:
            bad("n_embd", f"a multiple of n_head={self.n_head}, got {self.n_embd}")
        self.level_vocab = tuple(self.level_vocab)
        if self.level_vocab and (len(self.level_vocab) != self.levels or any(
                not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.vocab_size
                for k in self.level_vocab)):
            bad("level_vocab", f"() or {self.levels} ints in [1, vocab_size={self.vocab_size}], "
                f"got {self.level_vocab!r}")
        for f in ("class_dropout", "dropout"):
            v = getattr(self, f)
            if not 0.0 <= v < 1.0:
                bad(f, f"a probability in [0, 1), got {v!r}")

    @property
    def seq_len(self):
        """T = h * w * L tokens per image."""
        return self.grid_h * self.grid_w * self.levels


# Named sizes (DiT's DiT_models idea). IBQ-B matches the paper's ImageNet AR generator
# (24 layers, 1024 wide, 16 heads: ~300M in the blocks before the K-way head grows).
MODELS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64),  # tests
    "mini": dict(n_layer=4, n_head=4, n_embd=128),  # CPU MNIST runs
    "S": dict(n_layer=12, n_head=6, n_embd=384),
    "B": dict(n_layer=12, n_head=12, n_embd=768),
    "IBQ-B": dict(n_layer=24, n_head=16, n_embd=1024),
}

# -----------------------------------------------------------------------------
# small modules


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_embd, self.layer_idx = config.n_head, config.n_embd, layer_idx
        self.causal = config.mode == "ar"
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        B, n, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, n, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, n, hd)
        is_causal, mask = self.causal, None
        if cache is not None:  # AR sampling: the n new slots come after the p = cache.pos cached ones
            p = cache.pos
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, p + n, hd)
            is_causal = False  # one new slot sees every key; is_causal would align a block top-left
            if n > 1:  # new slot p + i sees keys [0, p + i]: the causal mask shifted by p
                mask = torch.ones(n, p + n, dtype=torch.bool, device=x.device).tril(p)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, n, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys/values of the slots seen so far, for AR sampling. A call may bring any number n of
    new slots: they attend causally, to the cached ones and to each other (Attention.forward).
    Buffers (B, n_head, max_len, hd) are allocated on first write, in the dtype the layers
    produce (so autocast just works)."""

    def __init__(self, n_layer, max_len):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.max_len = max_len
        self.pos = 0  # slots already stored; the model advances it after all layers ran

    def update(self, layer, k, v):
        """Store (B, nh, n, hd) k/v at [pos, pos + n); return all keys/values up to pos + n."""
        p, n = self.pos, k.size(2)
        if p + n > self.max_len:
            raise ValueError(f"KVCache: {p + n} slots exceed max_len={self.max_len}")
        if self.k[layer] is None:
            B, nh, _, hd = k.shape
            self.k[layer] = k.new_zeros(B, nh, self.max_len, hd)
            self.v[layer] = v.new_zeros(B, nh, self.max_len, hd)
        self.k[layer][:, :, p : p + n] = k
        self.v[layer][:, :, p : p + n] = v
        return self.k[layer][:, :, : p + n], self.v[layer][:, :, : p + n]


# -----------------------------------------------------------------------------
# the model


def mask_fraction(r, schedule="cosine"):
    """MaskGIT schedule gamma: r in [0, 1] -> fraction masked, gamma(0) = 1, gamma(1) = 0.
    Training masks (GPT.sample_mask) and the sampler's unmasking both follow it."""
    if schedule == "cosine":
        return torch.cos(r * (math.pi / 2))
    if schedule == "arccos":
        return torch.arccos(r) / (math.pi / 2)
    raise ValueError(f"mask schedule: expected one of {MASK_SCHEDULES}, got {schedule!r}")


# MaskGIT sampling computes logits for this many masked positions at a time: (rows, K) instead
# of all (B, T, K) at once (B = 250, T = 256, K = 131,072 would be 34 GB of fp32 logits)
SAMPLE_ROWS = 4096


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.level_vocab and type(self) is GPT:
            raise ValueError("GPTConfig.level_vocab: build support.factorized.FactorizedGPT, not GPT")
        self.config = config
        K, C = config.vocab_size, config.n_embd
        self.mask_token = K if config.mode == "maskgit" else None  # input-only id, never predicted
        self.null_class = config.num_classes  # the class id used for "no label" (CFG)
        self.tok_emb = nn.Embedding(K + (config.mode == "maskgit"), C)
        self.pos_emb = nn.Embedding(config.grid_h * config.grid_w, C)  # spatial position t // L
        self.lvl_emb = nn.Embedding(config.levels, C)  # RQ level t % L
        self.cls_emb = nn.Embedding(config.num_classes + 1, C)  # last row: the null class
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(C, bias=config.bias)
        # K-way output head, shared by all levels; bias iff config.bias (pass model.head.bias,
        # which may be None, to fused_linear_snce). Untied from tok_emb.
        self.head = nn.Linear(C, K, bias=config.bias)
        T = config.seq_len
        self.register_buffer("slot_pos", torch.arange(T) // config.levels, persistent=False)
        self.register_buffer("slot_lvl", torch.arange(T) % config.levels, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding drops the lookup tables (they cost no FLOPs).
        The head is always counted: with K = 131k it is a large part of the model."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for m in (self.tok_emb, self.pos_emb, self.lvl_emb, self.cls_emb))
        return n

    def estimate_flops_per_token(self):
        """Training FLOPs (forward + backward) per token, PaLM appendix B: 6N + 12 * l * C * T.
        N includes the head; SNCE's target matmul (D x K per token, D small) is left out."""
        cfg = self.config
        T = cfg.seq_len + (cfg.mode == "maskgit")
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_second, peak_flops=989e12):
        """Model FLOPs utilization; peak_flops default: H100 bf16 dense."""
        return self.estimate_flops_per_token() * tokens_per_second / peak_flops

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on tensors with dim >= 2 (matmuls, embeddings) only."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = dict(fused=True) if device_type == "cuda" else {}  # CPU keeps torch's default
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **fused)

    # ---- forward -----------------------------------------------------------

    def _slot_emb(self, start, n):
        """Spatial + level embedding of slots [start, start + n): (n, C)."""
        return self.pos_emb(self.slot_pos[start : start + n]) + self.lvl_emb(self.slot_lvl[start : start + n])

    def embed(self, tokens, start):
        """Token embeddings (B, n, C) of tokens (B, n) at token positions [start, start + n)."""
        return self.tok_emb(tokens)

    def level_head(self, level):
        """The head that predicts tokens of RQ level `level`: the one K-way head for all."""
        return self.head

    def _hidden(self, codes, labels, mask=None):
        """Unchecked forward: codes (B, T) long, labels (B,) long incl. null -> (B, T, C)."""
        cls = self.cls_emb(labels)[:, None]  # (B, 1, C)
        if self.config.mode == "ar":
            # input slot t holds token t-1 (slot 0: the class) plus the position/level embedding
            # of token t, the one it predicts, so the model knows which level comes next
            x = torch.cat([cls, self.embed(codes[:, :-1], 0)], dim=1) + self._slot_emb(0, codes.size(1))
        else:
            if mask is not None:
                codes = codes.masked_fill(mask, self.mask_token)
            x = torch.cat([cls, self.embed(codes, 0) + self._slot_emb(0, codes.size(1))], dim=1)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return x if self.config.mode == "ar" else x[:, 1:]  # maskgit: drop the class slot

    def forward_hidden(self, codes, labels=None, mask=None):
        """Final-normed hidden states (B, T, n_embd); model.head maps them to (B, T, K) logits.

        codes: (B, T) or (B, h, w, L) ints in [0, K); labels: (B,) class ids in
        [0, num_classes), or None for unconditional. In training mode labels are replaced by
        the null class with probability class_dropout (CFG). mask (maskgit only): (B, T) bool,
        True = replaced by the [MASK] token, and the positions the loss counts (Eq. 3 / 15).
        ar: hidden[:, t] predicts codes[:, t] from the class and codes[:, :t].
        """
        codes = flat_codes(codes, self.config)
        B = codes.size(0)
        labels = checked_labels(labels, B, self.config, codes.device)
        if mask is not None:
            if self.config.mode == "ar":
                raise ValueError("mask: expected None in 'ar' mode (every position counts); "
                                 "the mask is for 'maskgit'")
            mask = flat_mask(mask, B, self.config)
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(B, device=codes.device) < self.config.class_dropout
            labels = labels.masked_fill(drop, self.null_class)
        return self._hidden(codes, labels, mask)

    def forward(self, codes, labels=None, mask=None, return_hidden=False):
        """Logits (B, T, K) = head(forward_hidden(...)), for tests and small K; with
        return_hidden=True the (B, T, n_embd) hidden states instead, which the fused SNCE loss
        (Eq. 8) takes with model.head. Under DDP call ddp_model(codes, labels, mask,
        return_hidden=True) rather than .module.forward_hidden: DDP prepares its gradient
        all-reduce only when its own forward runs."""
        hidden = self.forward_hidden(codes, labels, mask)
        return hidden if return_hidden else self.head(hidden)

    def sample_mask(self, B, T=None, generator=None, device=None):
        """MaskGIT training mask (B, T) bool, True = masked (fed as [MASK], counted by the loss).
        Per sample: r ~ U[0, 1), n = clamp(ceil(gamma(r) * T), 1, T) random positions masked,
        gamma the config's cosine/arccos schedule, so at least one token is always masked."""
        T = self.config.seq_len if T is None else T
        device = device if device is not None else self.lvl_emb.weight.device
        gdev = generator.device if generator is not None else device
        r = torch.rand(B, generator=generator, device=gdev)
        n = (mask_fraction(r, self.config.mask_schedule) * T).ceil().clamp(1, T)
        scores = torch.rand(B, T, generator=generator, device=gdev)
        rank = scores.argsort(dim=1).argsort(dim=1)  # a random permutation per row
        return (rank < n[:, None]).to(device)

    # ---- sampling ----------------------------------------------------------

    @torch.no_grad()
    def generate(self, labels=None, cfg_scale=1.0, temperature=1.0, top_k=None, top_p=None,
                 steps=None, generator=None, num_samples=None, gumbel_temperature=4.5):
        """Sample codes (B, h, w, L) for class labels (B,) (None + num_samples: unconditional).

        cfg_scale != 1 runs cond and null-class rows in one batch: logits = u + s * (c - u).
        temperature 0 = greedy. top_k / top_p filter the (guided) logits.
        ar: T steps with a KV cache (steps is ignored).
        maskgit: `steps` forward passes (default min(8, T), at most T); after step s the
        gamma((s + 1) / steps) * T least confident tokens stay masked (at least one is unmasked
        per step); confidence = log p(sampled token) + gumbel_temperature * (1 - (s + 1)/steps)
        * Gumbel noise (MaskGIT's annealed choice noise); unmasked tokens are never re-masked.
        """
        cfg = self.config
        device = self.lvl_emb.weight.device
        if labels is None:
            if num_samples is None:
                raise ValueError("generate: expected labels (B,) or num_samples for unconditional")
            B = num_samples
        else:
            if not torch.is_tensor(labels) or labels.dim() != 1:
                raise ValueError(f"labels: expected a (B,) tensor of class ids (or None with num_samples), "
                                 f"got {tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__}")
            B = labels.size(0)
            labels = labels.to(device)
        labels = checked_labels(labels, B, self.config, device)
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator: expected one on the model's device ({device.type}), "
                             f"got {generator.device.type} (torch.multinomial needs them equal)")
        if cfg_scale != 1.0:  # one batch: cond rows first, then the null class
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        was_training = self.training
        self.eval()  # no dropout while sampling
        try:
            if cfg.mode == "ar":
                codes = self._generate_ar(labels, B, cfg_scale, temperature, top_k, top_p, generator)
            else:
                codes = self._generate_maskgit(labels, B, cfg_scale, temperature, top_k, top_p,
                                               steps, generator, gumbel_temperature)
        finally:
            self.train(was_training)
        return codes.view(B, cfg.grid_h, cfg.grid_w, cfg.levels)

    @staticmethod
    def _guided(hidden, cfg_scale):
        """(reps B, ..., C) head inputs -> (B, ..., C): the head is linear, so guiding its input
        guides the logits, with one (B, ..., K) logits block instead of two."""
        return cfg_combine(hidden, cfg_scale) if cfg_scale != 1.0 else hidden

    def _ar_step(self, labels, tokens, cache):
        """The next n slots through the KV cache -> final-normed hidden (B, n, C); slot t predicts
        token t and holds token t - 1 (slot 0: the class). So for p = cache.pos > 0, tokens (B, n)
        are tokens [p - 1, p - 1 + n); at p = 0, the n - 1 after the class (None: the class alone)."""
        p = cache.pos
        x = None if tokens is None else self.embed(tokens, max(p - 1, 0))
        if p == 0:
            cls = self.cls_emb(labels)[:, None]  # (B, 1, C)
            x = cls if x is None else torch.cat([cls, x], dim=1)
        x = x + self._slot_emb(p, x.size(1))  # (B, n, C)
        for block in self.blocks:
            x = block(x, cache)
        cache.pos += x.size(1)
        return self.ln_f(x)

    def _generate_ar(self, labels, B, cfg_scale, temperature, top_k, top_p, generator):
        T = self.config.seq_len
        cache = KVCache(self.config.n_layer, T)
        codes = torch.zeros(B, T, dtype=torch.long, device=labels.device)
        reps = labels.size(0) // B
        for t in range(T):
            prev = codes[:, t - 1 : t].repeat(reps, 1) if t else None  # both cfg halves: the same token
            hidden = self._ar_step(labels, prev, cache)[:, -1]           # (reps B, C)
            logits = self.level_head(t % self.config.levels)(self._guided(hidden, cfg_scale))  # (B, K)
            codes[:, t] = sample_logits(logits, temperature, top_k, top_p, generator)
        return codes

    def _generate_maskgit(self, labels, B, cfg_scale, temperature, top_k, top_p, steps, generator,
                          gumbel_temperature):
        cfg, T = self.config, self.config.seq_len
        steps = min(8, T) if steps is None else steps
        if not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"steps: expected an int in [1, T={T}], got {steps!r}")
        device = labels.device
        codes = torch.zeros(B, T, dtype=torch.long, device=device)
        masked = torch.ones(B, T, dtype=torch.bool, device=device)
        reps = labels.size(0) // B
        for s in range(steps):
            hidden = self._guided(self._hidden(codes.repeat(reps, 1), labels, masked.repeat(reps, 1)),
                                  cfg_scale)                                   # (B, T, C)
            # only the masked positions are drawn (known tokens stay): (n,), row-major order
            tok, lp = self._draw_masked(hidden, masked, temperature, top_k, top_p, generator)
            sampled = codes.masked_scatter(masked, tok)
            logp = torch.zeros(B, T, device=device).masked_scatter(masked, lp)
            # masked after this step: floor(gamma((s + 1) / steps) * T), at least one fewer, none at the end
            ratio = (s + 1) / steps
            n_cur = int(masked[0].sum())  # the same in every row
            gamma = mask_fraction(torch.tensor(ratio, dtype=torch.float64), cfg.mask_schedule).item()
            n_next = int(math.floor(T * gamma))
            n_next = 0 if s == steps - 1 else max(0, min(n_next, n_cur - 1))
            remask = torch.zeros_like(masked)
            if n_next > 0:  # re-mask the n_next least confident of the newly drawn tokens
                gumbel = gumbel_noise((B, T), generator, device)
                conf = logp + gumbel_temperature * (1 - ratio) * gumbel
                conf = conf.masked_fill(~masked, float("inf"))  # known tokens stay known
                remask.scatter_(1, torch.topk(conf, n_next, dim=1, largest=False).indices, True)
            codes, masked = sampled, remask
        return codes

    def _draw_masked(self, hidden, masked, *sampling):
        """Tokens and their log p (n,), (n,) for the masked slots of hidden (B, T, C), row-major."""
        return self._draw_rows(hidden[masked], self.head, *sampling)

    @staticmethod
    def _draw_rows(h, head, temperature, top_k, top_p, generator):
        """Draw from head(h) for rows h (n, C), SAMPLE_ROWS at a time: tokens (n,), log p (n,)."""
        picks, logps = [], []
        for rows in h.split(SAMPLE_ROWS):
            lf = head(rows).float()                                             # (rows, K)
            tok = sample_logits(lf, temperature, top_k, top_p, generator)
            logps.append(lf.gather(-1, tok[:, None])[:, 0] - lf.logsumexp(-1))  # log p(tok)
            picks.append(tok)
        return torch.cat(picks), torch.cat(logps)

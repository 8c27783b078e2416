"""
Factorised heads for implicit codebooks (LFQ / FSQ): a position's code, one of prod_d |levels_d|
(2^18 for Open-MAGVIT2's LFQ), is split into G sub-tokens over consecutive groups of dimensions
(Open-MAGVIT2's 6 + 12 bits), laid out as the generator's G levels, T = h * w * G. Each sub-token
has its own vocabulary (K_g = 2^|group| codes) and head, and its SNCE target is the exact
marginal q_g of Eq. 5 over its group's dimensions (support/implicit.py): for l2 the product
codebook's q factorises, so nothing of size K = prod_g K_g is built.

    FactorizedGPT   model.py's GPT with per-level vocabularies (GPTConfig.level_vocab): one
                    token table holding level g's K_g rows (and its [MASK]) after those of the
                    levels before it, one head per level
    TokenGroups     train.py's `token_groups`: the tokenizer's codes <-> sub-tokens, each group's
                    enumerated codebook, and the per-group losses (CE or SNCE) through the fused
                    loss

    python train.py config/train_mnist.py --data_dir=$ENC/train --val_dir=$ENC/val \\
        --tokenizer_ckpt=imagenet_256_L.ckpt --token_groups=6,12 --tau=0.5
"""

import torch
import torch.nn as nn

from model import GPT
from snce import fused_linear_snce_levels
from support.implicit import as_levels, digits_to_code, group_dims, implicit_codebook, split_codes
from support.model_checks import flat_codes


def join_sub_tokens(sub, level_vocab):
    """(B, h, w, G) sub-tokens -> (B, h, w, 1) tokenizer codes: group g's sub-token is the
    mixed-radix digit of weight prod_{j<g} K_j (split_codes's convention)."""
    return digits_to_code(sub, [range(k) for k in level_vocab])[..., None]


def make_gpt(config):
    """GPT, or FactorizedGPT when config.level_vocab gives each level its own vocabulary."""
    return (FactorizedGPT if config.level_vocab else GPT)(config)


class FactorizedGPT(GPT):
    """GPT whose L levels have their own vocabularies K_l = config.level_vocab[l] and heads
    (model.heads[l] = model.level_head(l)); forward without return_hidden gives a list of L
    (B, h*w, K_l) logits. vocab_size must be max K_l: the base's [MASK] id (maskgit) is
    vocab_size, and `embed` sends it to the slot's level's own [MASK] row."""

    def __init__(self, config):
        if not config.level_vocab:
            raise ValueError("FactorizedGPT: expected GPTConfig.level_vocab (K_1, .., K_L), got ()")
        if config.vocab_size != max(config.level_vocab):
            raise ValueError(f"FactorizedGPT: expected vocab_size = max(level_vocab) = "
                             f"{max(config.level_vocab)}, got {config.vocab_size}")
        super().__init__(config)
        Ks, extra, C = config.level_vocab, int(config.mode == "maskgit"), config.n_embd
        first = torch.tensor([0] + [k + extra for k in Ks[:-1]]).cumsum(0)      # (L,) first row
        lvl = torch.arange(config.seq_len) % config.levels                      # (T,) slot level
        self.register_buffer("slot_row", first[lvl], persistent=False)          # level's first row
        self.register_buffer("slot_vocab", torch.tensor(Ks)[lvl], persistent=False)  # its K_l
        del self.head                                                           # one head a level
        self.tok_emb = nn.Embedding(sum(k + extra for k in Ks), C)
        self.heads = nn.ModuleList(nn.Linear(C, k, bias=config.bias) for k in Ks)
        for m in (self.tok_emb, *self.heads):
            self._init_weights(m)

    def embed(self, tokens, start):
        """Level l's token k is row first_l + k of the table; [MASK] is first_l + K_l."""
        n = tokens.size(1)
        row, vocab = self.slot_row[start : start + n], self.slot_vocab[start : start + n]
        if self.mask_token is not None:
            tokens = torch.where(tokens == self.mask_token, vocab, tokens)
        return self.tok_emb(tokens + row)

    def level_head(self, level):
        return self.heads[level]

    def forward_hidden(self, codes, labels=None, mask=None):
        flat = flat_codes(codes, self.config)
        if not torch.compiler.is_compiling() and (flat >= self.slot_vocab[: flat.size(1)]).any():
            raise ValueError(f"codes: level l's tokens must lie in [0, K_l), "
                             f"level_vocab={self.config.level_vocab}")
        return super().forward_hidden(flat, labels, mask)

    def forward(self, codes, labels=None, mask=None, return_hidden=False):
        hidden = super().forward(codes, labels, mask, return_hidden=True)
        if return_hidden:
            return hidden
        L = self.config.levels
        return [self.heads[l](hidden[:, l::L]) for l in range(L)]   # (B, h*w, K_l) each

    def _draw_masked(self, hidden, masked, *sampling):
        """Each masked slot drawn from its level's head; (n,) tokens and log p, row-major."""
        lvl = self.slot_lvl.expand_as(masked)[masked]                          # (n,)
        h = hidden[masked]                                                      # (n, C)
        tok = torch.empty(len(h), dtype=torch.long, device=h.device)
        logp = torch.empty(len(h), device=h.device)
        for l, head in enumerate(self.heads):
            sel = lvl == l
            if sel.any():
                tok[sel], logp[sel] = self._draw_rows(h[sel], head, *sampling)
        return tok, logp


class TokenGroups:
    """train.py's token_groups (e.g. (6, 12)) over an implicit-codebook tokenizer `tok` (its
    `level_values`, one code per position, L = 1): split / join codes, and the per-group losses.
    Only l2 (the metric under which q factorises) and one tau for every group."""

    def __init__(self, tok, groups, L, D, device):
        groups = tuple(groups)
        if L != 1 or not hasattr(tok, "level_values") or not all(
                isinstance(g, int) and not isinstance(g, bool) for g in groups):
            raise ValueError(f"token_groups={groups!r}: expected sizes (ints) of consecutive "
                             f"dimension groups and an implicit-codebook tokenizer (LFQ: one code "
                             f"per position), got L={L} and {type(tok).__name__}")
        self.groups, self.D = groups, D
        self.level_values = as_levels(tok.level_values)
        try:
            self.dims = group_dims(groups, D)
        except ValueError as e:
            raise ValueError(f"token_groups={groups!r} for the tokenizer's {D} dims: {e}") from None
        self.books = [implicit_codebook([self.level_values[d] for d in g], device=device)
                      for g in self.dims]             # group g's codes (K_g, |g|)
        self.level_vocab = tuple(len(b) for b in self.books)

    @staticmethod
    def check_options(loss, target_perplexity, tau_scale, metric):
        if loss == "control" or target_perplexity > 0 or tau_scale != "none" or (
                loss in ("snce", "control") and metric != "l2"):
            raise ValueError("token_groups: loss=control, target_perplexity, tau_scale and metrics "
                             "other than l2 are not supported: give tau (one temperature for "
                             "every group)")

    def split(self, codes):
        """(B, h, w, 1) tokenizer codes -> (B, h, w, G) sub-tokens."""
        return torch.stack(split_codes(codes[..., 0], self.level_values, self.groups), -1)

    def join(self, sub):
        return join_sub_tokens(sub, self.level_vocab)

    def level_losses(self, model, hid, cod, z, msk, kind, taus, label_smoothing):
        """Per-group loss sums (G,): hid (B, h*w, G, H), sub-tokens cod (B, h*w, G), latents
        z (B, h*w, D), mask (B, h*w, G) or None, taus (G,). 'snce': sub-token g against q_g, the marginal
        of Eq. 5 over group g's dims (its enumerated codebook); 'ce' / 'ls': the sub-token as a
        hard label. Eq. 8 of the product model p = prod_g p_g is the sum of the G terms."""
        sums = []
        for g, dims in enumerate(self.dims):
            head, sl = model.heads[g], slice(g, g + 1)
            if kind == "snce":
                kw = dict(latents=z[..., None, list(dims)], codebooks=self.books[g][None],
                          taus=taus[sl], metric="l2")
            else:
                kw = dict(latents=None, codebooks=None, taus=0.0, targets=cod[:, :, sl],
                          label_smoothing=label_smoothing if kind == "ls" else 0.0)
            sums.append(fused_linear_snce_levels(hid[:, :, sl], head.weight, bias=head.bias,
                                                 reduction="sum",
                                                 mask=None if msk is None else msk[:, :, sl], **kw))
        return torch.cat(sums)

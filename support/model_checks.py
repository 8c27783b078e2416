"""
Input checks of the generator's entry points (model.GPT.forward_hidden / forward / generate):
a wrong shape, dtype or id range is a ValueError that says what was expected. Cheap: one
min / max per call, skipped while torch.compile traces.

    codes = flat_codes(codes, config)                   # (B, T) or (B, h, w, L) -> (B, T) long
    labels = checked_labels(labels, B, config, device)  # (B,) long; None -> the null class
    mask = flat_mask(mask, B, config)                   # (B, T) bool
"""

import torch


def flat_codes(codes, config):
    """codes (B, T) or (B, h, w, L), any integer dtype -> (B, T) long in [0, K)."""
    T, shape4 = config.seq_len, (config.grid_h, config.grid_w, config.levels)
    if not torch.is_tensor(codes) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes: expected an integer tensor, got "
                         f"{codes.dtype if torch.is_tensor(codes) else type(codes).__name__}")
    codes = codes.long()  # memmaps hold uint16 / int32; min/max and Embedding want int64
    if codes.dim() == 4 and tuple(codes.shape[1:]) == shape4:
        codes = codes.reshape(codes.size(0), T)  # (B, h, w, L) -> (B, T), position-major
    if codes.dim() != 2 or codes.size(1) != T:
        raise ValueError(f"codes: expected shape (B, {T}) or (B, {', '.join(map(str, shape4))}) "
                         f"(T = h*w*L), got {tuple(codes.shape)}")
    if not torch.compiler.is_compiling() and codes.numel():
        lo, hi = codes.min().item(), codes.max().item()
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"codes: expected values in [0, {config.vocab_size}), "
                             f"got min {lo} max {hi}")
    return codes


def checked_labels(labels, B, config, device):
    """labels (B,) ints in [0, num_classes), or None -> (B,) long; None gives every row the
    null class (id num_classes): unconditional."""
    nc = config.num_classes
    if labels is None:
        return torch.full((B,), nc, dtype=torch.long, device=device)
    if not torch.is_tensor(labels) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer tensor of shape ({B},) or None, got "
                         f"{labels.dtype if torch.is_tensor(labels) else type(labels).__name__}")
    if tuple(labels.shape) != (B,):
        raise ValueError(f"labels: expected shape ({B},), got {tuple(labels.shape)}")
    if not torch.compiler.is_compiling() and B:
        lo, hi = labels.min().item(), labels.max().item()
        if lo < 0 or hi >= nc:
            raise ValueError(f"labels: expected class ids in [0, {nc}) (None = unconditional), "
                             f"got min {lo} max {hi}")
    return labels.long()


def flat_mask(mask, B, config):
    """mask (B, T) or the codes' shape, bool (True = masked) -> (B, T)."""
    T = config.seq_len
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor (True = masked), got {mask.dtype}")
    if mask.numel() != B * T or mask.size(0) != B:
        raise ValueError(f"mask: expected shape ({B}, {T}) or the codes' shape, "
                         f"got {tuple(mask.shape)}")
    return mask.reshape(B, T)

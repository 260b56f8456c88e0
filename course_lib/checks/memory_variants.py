"""The mistakes (and correct alternatives) that the checks of notebook 05_memory_compute_tradeoffs
(:mod:`course_lib.checks.memory`) know, as edits of the solution cells.

A list this long lives beside its check module; ``tests/test_check_variants.py`` runs each
entry through its real check cell (:mod:`course_lib.checks.variants`)."""

from __future__ import annotations

from course_lib.checks.core import OWN_WORK_PREFIX
from course_lib.checks.variants import BLOCK, alternative, mistake

__all__ = ["VARIANTS"]


# ---------------------------------------------------------------------------------------------
# The mistakes the checks know (tests/test_check_variants.py runs each through its check cell)
# ---------------------------------------------------------------------------------------------

_SB = "nb05_saved_bytes_impl"
_CK = "nb05_checkpointing_impl"
_GA = "nb05_grad_accum_impl"
_A8 = "nb05_adam8bit_impl"
_OWN = OWN_WORK_PREFIX

VARIANTS = (
    # -- saved activation bytes ------------------------------------------------------------
    mistake(_SB, "no_dedupe", "counts every packed tensor, repeats and views included",
            [("        if ptr not in state:\n            saved[ptr] = t",
              "        if ptr not in state:\n            saved[len(saved)] = t")],
            says="count each storage once"),
    mistake(_SB, "view_data_ptr", "keys the storages by t.data_ptr() (where the view starts)",
            [("        ptr = t.untyped_storage().data_ptr()\n        if ptr not in state:",
              "        ptr = t.data_ptr()\n        if t.untyped_storage().data_ptr() not in "
              "state:")],
            says="two views of one storage were counted twice"),
    mistake(_SB, "view_bytes", "counts the elements of the saved view, not its storage",
            [("total = sum(t.untyped_storage().nbytes() for t in saved.values())",
              "total = sum(t.numel() * t.element_size() for t in saved.values())")],
            says="a saved view keeps its whole storage alive"),
    mistake(_SB, "with_state", "does not leave out the model's parameters and buffers",
            [("        if ptr not in state:\n            saved[ptr] = t",
              "        saved[ptr] = t")],
            says="the parameters (and buffers) of `model` were counted"),
    mistake(_SB, "with_buffers", "leaves out the parameters but not the buffers",
            [("[*model.parameters(), *model.buffers()]", "model.parameters()")],
            says="the model's buffers were counted"),
    mistake(_SB, "with_params", "leaves out the buffers but not the parameters",
            [("[*model.parameters(), *model.buffers()]", "model.buffers()")],
            says="leave out the storages of model.parameters()"),
    mistake(_SB, "no_return", "forgets the return",
            [("    return total\n", "")], says="forget the `return`"),
    mistake(_SB, "float", "returns the size in KiB as a float",
            [("    return total\n", "    return total / 1024\n")], says="not an int"),
    mistake(_SB, "outside_hooks", "runs fn() outside the hooks, counting nothing",
            [("    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):\n"
              "        out = fn()",
              "    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):\n"
              "        pass\n    out = fn()")],
            says="nothing was counted"),
    mistake(_SB, "delegates", "uses the library's SavedTensorsMeter",
            [(BLOCK, """
              from course_lib.utils.memory import SavedTensorsMeter
              with SavedTensorsMeter(model) as meter:
                  out = fn()
              del out
              return meter.nbytes
              """)],
            says=_OWN),
    alternative(_SB, "storage_keys_list", "keeps the tensors in a list and dedupes by storage",
                [(BLOCK, """
                  skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
                  skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
                  kept, seen = [], set()

                  def pack(t):
                      ptr = t.untyped_storage().data_ptr()
                      if ptr not in skip and ptr not in seen:
                          seen.add(ptr)
                          kept.append(t)
                      return t

                  with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                      out = fn()
                  del out
                  return sum(int(t.untyped_storage().nbytes()) for t in kept)
                  """)]),
    # -- checkpointing ---------------------------------------------------------------------
    mistake(_CK, "no_checkpoint", "applies the blocks without checkpoint",
            [("x = checkpoint(block, x, use_reentrant=False)", "x = block(x)")],
            says="nothing was checkpointed"),
    mistake(_CK, "reentrant", "uses use_reentrant=True",
            [("x = checkpoint(block, x, use_reentrant=False)",
              "x = checkpoint(block, x, use_reentrant=True)")],
            says="pass use_reentrant=False"),
    mistake(_CK, "default_reentrant", "leaves out use_reentrant (its default is True)",
            [("checkpoint(block, x, use_reentrant=False)", "checkpoint(block, x)")],
            says="its default is use_reentrant=True"),
    mistake(_CK, "one_segment", "checkpoints the whole stack as one segment",
            [(BLOCK, """
              def run_all(h):
                  for block in blocks:
                      h = block(h)
                  return h

              return checkpoint(run_all, x, use_reentrant=False)
              """)],
            says="the whole stack is one checkpointed segment"),
    mistake(_CK, "only_first", "checkpoints only the first block",
            [(BLOCK, """
              x = checkpoint(blocks[0], x, use_reentrant=False)
              for block in blocks[1:]:
                  x = block(x)
              return x
              """)],
            says="were not checkpointed"),
    mistake(_CK, "no_grad", "runs the blocks under torch.no_grad()",
            [(BLOCK, """
              with torch.no_grad():
                  for block in blocks:
                      x = block(x)
              return x
              """)],
            says="torch.no_grad()"),
    mistake(_CK, "detach", "detaches the input of every block",
            [("checkpoint(block, x, use_reentrant=False)",
              "checkpoint(block, x.detach(), use_reentrant=False)")],
            says="has no gradient"),
    mistake(_CK, "not_assigned", "does not pass the output on to the next block",
            [("x = checkpoint(block, x, use_reentrant=False)",
              "y = checkpoint(block, x, use_reentrant=False)")],
            says="returned its input x unchanged"),
    mistake(_CK, "reversed", "applies the blocks in reverse order",
            [("for block in blocks:", "for block in reversed(blocks):")],
            says="applied last to first"),
    mistake(_CK, "called_block", "passes block(x) instead of the block",
            [("checkpoint(block, x, use_reentrant=False)",
              "checkpoint(block(x), use_reentrant=False)")],
            says="not checkpoint(block(x), ...)"),
    mistake(_CK, "no_return", "forgets the return", [("    return x\n", "")],
            says="returned None"),
    mistake(_CK, "delegates", "uses torch's checkpoint_sequential",
            [(BLOCK, """
              from torch.utils.checkpoint import checkpoint_sequential
              return checkpoint_sequential(blocks, len(blocks), x, use_reentrant=False)
              """)],
            says=_OWN),
    alternative(_CK, "indexed_loop", "indexes the blocks and passes the block's forward",
                [(BLOCK, """
                  for i in range(len(blocks)):
                      x = checkpoint(blocks[i].forward, x, use_reentrant=False)
                  return x
                  """)]),
    # -- gradient accumulation -------------------------------------------------------------
    mistake(_GA, "micro_mean", "divides by the micro-batch's own token count",
            [("/ total_tokens", "/ mask.sum()")], says="Pitfall 5"),
    mistake(_GA, "no_mask", "counts every position (padding too)",
            [("(per_token * mask.to(per_token.dtype)).sum()", "per_token.sum()")],
            says="multiply the per-token losses by the mask"),
    mistake(_GA, "no_division", "returns the masked sum",
            [("(per_token * mask.to(per_token.dtype)).sum() / total_tokens",
              "(per_token * mask.to(per_token.dtype)).sum()")],
            says="not divided by total_tokens"),
    mistake(_GA, "default_mean", "uses F.cross_entropy's default mean over all positions",
            [(BLOCK, """
              return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
              """)],
            says="default reduction='mean'"),
    mistake(_GA, "positions", "divides by the number of positions (mask.numel())",
            [("/ total_tokens", "/ mask.numel()")], says="mask.numel()"),
    mistake(_GA, "floor_division", "divides with //",
            [("/ total_tokens", "// total_tokens")], says="floor division"),
    mistake(_GA, "divides_twice", "takes the micro-batch mean, then divides by total_tokens",
            [("/ total_tokens", "/ mask.sum() / total_tokens")], says="divides twice"),
    mistake(_GA, "per_sequence_mean", "averages each sequence first",
            [("return (per_token * mask.to(per_token.dtype)).sum() / total_tokens",
              "m = mask.to(per_token.dtype)\n"
              "    return ((per_token * m).sum(-1) / m.sum(-1)).sum() / total_tokens")],
            says="averages each sequence over its own tokens"),
    mistake(_GA, "not_scalar", "returns the per-token losses",
            [("(per_token * mask.to(per_token.dtype)).sum() / total_tokens",
              "per_token * mask.to(per_token.dtype) / total_tokens")],
            says="scalar tensor"),
    mistake(_GA, "item", "returns a Python float",
            [("(per_token * mask.to(per_token.dtype)).sum() / total_tokens",
              "((per_token * mask.to(per_token.dtype)).sum() / total_tokens).item()")],
            says="not .item()"),
    mistake(_GA, "no_flatten", "passes (B, T, V) logits to F.cross_entropy",
            [("logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=\"none\"",
              "logits, targets, reduction=\"none\"")],
            says="flatten them"),
    mistake(_GA, "delegates", "uses the course's lm_loss",
            [(BLOCK, """
              from course_lib.model.tinygpt import lm_loss
              return lm_loss(logits, targets, mask, reduction="sum") / total_tokens
              """)],
            says=_OWN),
    alternative(_GA, "boolean_index", "selects the counted positions with the mask",
                [(BLOCK, """
                  keep = mask.bool()
                  return F.cross_entropy(logits[keep], targets[keep], reduction="sum") / total_tokens
                  """)]),
    alternative(_GA, "transpose_ignore_index", "vocabulary on dim 1 and ignore_index",
                [(BLOCK, """
                  ignored = targets.masked_fill(~mask.bool(), -100)
                  loss = F.cross_entropy(logits.transpose(1, 2), ignored, reduction="sum")
                  return loss / total_tokens
                  """)]),
    # -- 8-bit AdamW state ----------------------------------------------------------------
    mistake(_A8, "hard_min", "hard-codes the 4096 threshold",
            [("if numel < min_8bit_size:", "if numel < 4096:")],
            says="instead of the argument min_8bit_size"),
    mistake(_A8, "hard_blocksize", "hard-codes blocks of 256",
            [("-(-numel // blocksize)", "-(-numel // 256)")],
            says="instead of the argument blocksize"),
    mistake(_A8, "less_equal", "keeps 32-bit state at exactly min_8bit_size elements",
            [("if numel < min_8bit_size:", "if numel <= min_8bit_size:")],
            says="compare with <, not <="),
    mistake(_A8, "no_small_rule", "gives every tensor 8-bit state",
            [("    if numel < min_8bit_size:\n        return 8 * numel  # two fp32 states\n", "")],
            says="keep 32-bit state"),
    mistake(_A8, "no_absmax", "forgets the absmax constants",
            [("return 2 * numel + 2 * 4 * blocks", "return 2 * numel")],
            says="add the absmax constants"),
    mistake(_A8, "floor_blocks", "rounds the block count down",
            [("-(-numel // blocksize)", "numel // blocksize")],
            says="round the block count up"),
    mistake(_A8, "one_state", "counts one state",
            [("return 2 * numel + 2 * 4 * blocks", "return numel + 4 * blocks")],
            says="two states"),
    mistake(_A8, "one_absmax", "one absmax per block for both states",
            [("return 2 * numel + 2 * 4 * blocks", "return 2 * numel + 4 * blocks")],
            says="its own absmax per block"),
    mistake(_A8, "small_one_state", "4 bytes per element for small tensors",
            [("return 8 * numel  # two fp32 states", "return 4 * numel")],
            says="not 4"),
    mistake(_A8, "with_maps", "adds the shared quantisation maps",
            [("return 2 * numel + 2 * 4 * blocks", "return 2 * numel + 2 * 4 * blocks + 2048")],
            says="shared by all tensors"),
    mistake(_A8, "float_blocks", "divides without rounding (a float)",
            [("-(-numel // blocksize)", "numel / blocksize")],
            says="numel / blocksize is a float"),
    mistake(_A8, "no_return", "forgets the return",
            [("return 2 * numel + 2 * 4 * blocks", "2 * numel + 2 * 4 * blocks")],
            says="forget the `return`"),
    mistake(_A8, "delegates", "uses the library's adamw_state_bytes",
            [(BLOCK, """
              from course_lib.utils.memory import adamw_state_bytes
              return adamw_state_bytes([numel], "adamw8bit") - 2 * 256 * 4
              """)],
            says=_OWN),
    alternative(_A8, "math_ceil", "math.ceil for the blocks, 8-bit branch first",
                [(BLOCK, """
                  import math
                  if numel >= min_8bit_size:
                      return 2 * (numel + 4 * math.ceil(numel / blocksize))
                  return 2 * 4 * numel
                  """)]),
)

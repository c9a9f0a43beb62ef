"""What the token-weights stage shows a person (its HTML and markdown reports): sample rationales with each token
shaded by its learned weight, and step by step with the top-k keypoints in bold."""
from __future__ import annotations

from tasks.formats import EncodedRationale, keypoints


def shaded_html(tokenizer, items: list[EncodedRationale], weights: list[list[float]], limit: int = 12) -> str:
    """Sample rationales with every token shaded by its weight, for a person to see what was learned."""
    import html

    parts = ["<h2>Token weights (darker = more weight)</h2>"]
    for it, w in list(zip(items, weights))[:limit]:
        spans = []
        for j, tid in enumerate(it.ids[it.rationale_start:it.rationale_end]):
            text = html.escape(tokenizer.decode([tid]))
            spans.append(f'<span title="{w[j]:.2f}" style="background: rgba(220, 60, 20, {w[j]:.2f})">{text}</span>')
        parts.append(f"<p style='font-family: monospace'>{''.join(spans)}</p>")
    return "\n".join(parts)


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]|<>#"})


def bold_runs(tokens: list[str], keep: set[int]) -> str:
    """The tokens as markdown with the kept ones in **bold**: adjacent kept tokens share one run (subwords of a word),
    a token's leading space (byte-level tokens carry one) stays outside the markers, and punctuation is never bolded
    (markers around a lone "," render literally) — the per-step table lists it. Markdown characters are escaped."""
    out, bold = [], False
    for j, t in enumerate(tokens):
        lead, core = t[:len(t) - len(t.lstrip())], t.strip()
        strong = j in keep and any(c.isalnum() for c in core)
        core = core.translate(_MD_SPECIAL)
        if strong:
            if bold and not lead:
                out.append(core)                          # the next subword of the same bold run
                continue
            out.append(("**" if bold else "") + lead + "**" + core)
            bold = True
        else:
            out.append(("**" if bold else "") + lead + core)
            bold = False
    return "".join(out) + ("**" if bold else "")


UNIFORM_SPREAD = 0.1     # weights within this range of each other mark no token as a keypoint


def shaded_markdown(tokenizer, items: list[EncodedRationale], weights: list[list[float]], top_k: int, limit: int = 8) -> str:
    """Sample rationales, step by step: the text with its keypoints in bold, the step's mean weight, and its three
    highest-weighted tokens with their weights."""
    lines = ["# Token weights", "", f"Sample rationales step by step: the top-{top_k} keypoints by learned weight in "
             "**bold**, each step's mean weight and its three highest-weighted tokens.", ""]
    shown = [x for w in weights[:limit] for x in w]
    if shown and max(shown) - min(shown) < UNIFORM_SPREAD:
        lines += [f"**The weights are nearly uniform** ({min(shown):.2f}–{max(shown):.2f} over these rationales): no "
                  "token stands out, so the bold keypoints are only the top of near-equal weights and mark nothing the "
                  "module learned. The loss weights every token about equally (check token_weights.mask_penalty and "
                  "epochs).", ""]
    for n, (it, w) in enumerate(list(zip(items, weights))[:limit], start=1):
        keep = set(keypoints(w, top_k))
        toks = [tokenizer.decode([t]) for t in it.ids[it.rationale_start:it.rationale_end]]
        lines += [f"**Rationale {n}** (answer {it.answer})", "", "| step | text | mean weight | top tokens |",
                  "|---:|---|---:|---|"]
        start = 0
        for k, end in enumerate(it.step_ends, start=1):
            a, b = start, end - it.rationale_start
            if b <= a:
                continue
            top = sorted(range(a, b), key=lambda j: -w[j])[:3]
            shown = ", ".join(f"`{toks[j].strip() or '␣'}` {w[j]:.2f}".replace("|", "\\|") for j in top)
            text = bold_runs(toks[a:b], {j - a for j in keep if a <= j < b}).strip()
            lines.append(f"| {k} | {text} | {sum(w[a:b]) / (b - a):.2f} | {shown} |")
            start = b
        lines.append("")
    return "\n".join(lines) + "\n"

"""The validate report as one self-contained HTML page (`difflower validate --html report.html`).

The reference's and the artifact's images side by side with a heat map of their absolute
difference, the drift of the latents along the denoising run plotted (max abs per step, log
scale, in inline SVG), the component table with each output's gate, and the verdict. Images are
embedded as PNG data URIs, so the file opens anywhere without its neighbours.
"""

from __future__ import annotations

import base64
import html
import io
import math

import numpy as np

from difflower.validate.parity import ValidationReport

# The heat map's colours from no difference to the largest: black, purple, orange, pale yellow.
_STOPS = np.array([[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], dtype=np.float64)


def heat_map(reference: np.ndarray, artifact: np.ndarray) -> tuple[np.ndarray, float]:
    """|artifact - reference| per pixel (the largest over RGB, in 0-255 units) as colours scaled
    to the largest difference; returns the picture and that largest difference."""
    difference = np.abs(artifact.astype(np.int16) - reference.astype(np.int16)).max(axis=-1).astype(np.float64)
    largest = float(difference.max())
    t = difference / largest if largest > 0 else difference
    position = t * (len(_STOPS) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(_STOPS) - 2)
    frac = (position - low)[..., None]
    colours = _STOPS[low] * (1 - frac) + _STOPS[low + 1] * frac
    return colours.round().astype(np.uint8), largest


def _png(pixels: np.ndarray) -> str:
    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def drift_svg(trajectory: list[dict], width: int = 560, height: int = 220) -> str:
    """Max abs of the latents after each step (log scale) as an inline SVG line plot."""
    values = [max(float(row["max_abs"]), 1e-12) for row in trajectory]
    if not values:
        return "<p>no denoising steps were compared</p>"
    left, right, top, bottom = 64, 16, 12, 36
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    hi = max(hi, lo + 1)

    def x(i: int) -> float:
        return left + (width - left - right) * (i / max(len(values) - 1, 1))

    def y(v: float) -> float:
        return top + (height - top - bottom) * (hi - math.log10(v)) / (hi - lo)

    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
    ticks = "".join(
        f'<line x1="{left}" x2="{width - right}" y1="{y(10.0**e):.1f}" y2="{y(10.0**e):.1f}" class="grid"/>'
        f'<text x="{left - 6}" y="{y(10.0**e) + 4:.1f}" text-anchor="end">1e{e}</text>'
        for e in range(lo, hi + 1)
    )
    steps = "".join(
        f'<text x="{x(i):.1f}" y="{height - bottom + 16}" text-anchor="middle">{i}</text>'
        for i in range(len(values))
        if len(values) <= 12 or i % math.ceil(len(values) / 12) == 0
    )
    dots = "".join(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5"/>' for i, v in enumerate(values))
    return (
        f'<svg id="drift" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="max abs difference of the latents per step">'
        f"{ticks}{steps}"
        f'<polyline points="{points}" class="curve"/>{dots}'
        f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle">step</text>'
        f'<text x="12" y="{(top + height - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top + height - bottom) / 2})">max abs</text>'
        "</svg>"
    )


def render_html(report: ValidationReport) -> str:
    """The whole page."""
    e = html.escape
    s = report.settings
    verdict = "PASSED" if report.passed else "FAILED: a parity gate was missed"
    rows = []
    for name, component in report.components.items():
        for output, m in component.outputs.items():
            psnr = "inf" if m.psnr is None else f"{m.psnr:.1f}"
            rows.append(
                f"<tr><td>{e(name)}</td><td>{e(output)}</td><td>{m.max_abs:.3g}</td><td>{psnr}</td>"
                f"<td>{m.cosine:.6f}</td><td>{e(m.gate)}</td>"
                f'<td class="{"ok" if m.passed else "missed"}">{"ok" if m.passed else "MISSED"}</td></tr>'
            )
    sections = [
        f"<h1>difflower validate: {e(report.artifact)}</h1>",
        f'<p class="verdict {"ok" if report.passed else "missed"}" id="verdict">{e(verdict)}</p>',
        f"<p>{e(report.backend)} · {e(report.precision)} · engine {e(str(s.get('engine', '')))} · "
        f"reference {e(report.reference)} ({e(report.family)})"
        + (
            f" · {s['steps']} steps of {e(str(s['scheduler']))}, {s['batch']}x{s['height']}x{s['width']}, "
            f"seed {s['seed']}"
            if "steps" in s
            else ""
        )
        + "</p>",
        "<h2>components</h2>",
        '<table id="components"><tr><th>component</th><th>output</th><th>max abs</th><th>PSNR dB</th>'
        "<th>cosine</th><th>gate</th><th>verdict</th></tr>" + "".join(rows) + "</table>",
    ]
    if report.not_run is not None:
        sections.append(f"<p>trajectory and image: {e(report.not_run)}</p>")
    else:
        f, i = report.final_latents, report.image
        sections += [
            "<h2>the denoising run</h2>",
            drift_svg(report.trajectory),
            f"<p>final latents: max abs {f['max_abs']:.3g}; {e(f['gate'])}: {'ok' if f['passed'] else 'MISSED'}"
            f"<br>image: PSNR {'inf' if i['psnr'] is None else format(i['psnr'], '.1f')} dB; "
            f"{e(i['gate'])}: {'ok' if i['passed'] else 'MISSED'}</p>",
        ]
        if report.cache is not None:
            c = report.cache
            row = "".join("F" if full else "c" for full in c["full_steps"] or [])
            sections.append(
                f"<p>{e(c['policy'])}: artifact <code>{row}</code>, reference "
                f"<code>{''.join('F' if full else 'c' for full in c['reference_full_steps'] or [])}</code> "
                f"(F whole denoiser, c cached): {'same decisions' if c['passed'] else 'DIFFERENT decisions'}</p>"
            )
        if report.images is not None:
            reference, artifact = report.images["reference"], report.images["artifact"]
            heat, largest = heat_map(reference, artifact)
            figures = [
                ("reference", "the eager reference", reference),
                ("artifact", f"the artifact ({report.backend})", artifact),
                ("difference", f"|difference|, black 0 to yellow {largest:.0f} / 255", heat),
            ]
            sections.append(
                '<div class="images">'
                + "".join(
                    f'<figure><img id="{key}" src="{_png(pixels)}" alt="{e(caption)}">'
                    f"<figcaption>{e(caption)}</figcaption></figure>"
                    for key, caption, pixels in figures
                )
                + "</div>"
            )
    style = (
        "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:64rem;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2rem .6rem;text-align:left}"
        ".ok{color:#1b7f3b}.missed{color:#b00020}.verdict{font-weight:bold;font-size:1.2rem}"
        ".images{display:flex;gap:1rem;flex-wrap:wrap}figure{margin:0}"
        "img{width:256px;image-rendering:pixelated;border:1px solid #ddd}"
        "svg text{font-size:11px;fill:#444}.grid{stroke:#eee}.curve{fill:none;stroke:#c0392b;stroke-width:2}"
        "svg circle{fill:#c0392b}"
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
        f"<title>difflower validate: {e(report.artifact)}</title><style>{style}</style></head>"
        f"<body>{''.join(sections)}</body></html>\n"
    )

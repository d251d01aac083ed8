"""The validate report on the terminal (the JSON file holds every number)."""

from __future__ import annotations

from difflower.validate.parity import ValidationReport


def _num(value: float | None, fmt: str = ".2e") -> str:
    if value is None:
        return "exact"
    return format(value, fmt)


def _psnr(value: float | None) -> str:
    return "inf" if value is None else f"{value:.1f}"


def _ok(passed: bool) -> str:
    return "ok" if passed else "MISSED"


def render(report: ValidationReport) -> str:
    """A readable table: components, the drift curve, the final latents and the image."""
    s = report.settings
    lines = [
        f"difflower validate: {report.artifact} ({report.backend}, {report.precision}, engine {s['engine']})",
        f"  reference {report.reference}; {report.family}, {s['steps']} steps of {s['scheduler']}, "
        f"{s['batch']}x{s['height']}x{s['width']}, seed {s['seed']}",
        *([f"  gates: {s['judged_as']}"] if s.get("judged_as") else []),
        "",
        f"  {'component':<16} {'output':<20} {'max abs':>9} {'PSNR dB':>8} {'cosine':>9}  gate",
    ]
    for name, component in report.components.items():
        for output, m in component.outputs.items():
            lines.append(
                f"  {name:<16} {output:<20} {_num(m.max_abs):>9} {_psnr(m.psnr):>8} {m.cosine:>9.6f}  "
                f"{m.gate}: {_ok(m.passed)}"
            )
    if report.not_run is not None:
        lines += ["", f"  trajectory and image: {report.not_run}", ""]
        lines.append("  PASSED (components)" if report.passed else "  FAILED: a parity gate was missed")
        return "\n".join(lines)
    lines += ["", f"  {'step':>4} {'timestep':>9} {'max abs':>9} {'PSNR dB':>8}   (latents after each step)"]
    for row in report.trajectory:
        lines.append(f"  {row['step']:>4} {row['timestep']:>9.2f} {_num(row['max_abs']):>9} {_psnr(row['psnr']):>8}")
    f, i = report.final_latents, report.image
    lines += [
        "",
        f"  final latents: max abs {_num(f['max_abs'])}, PSNR {_psnr(f['psnr'])} dB; {f['gate']}: {_ok(f['passed'])}",
        f"  image:         max abs {_num(i['max_abs'])}, PSNR {_psnr(i['psnr'])} dB; {i['gate']}: {_ok(i['passed'])}",
        *_cache_lines(report.cache),
        "",
        "  PASSED" if report.passed else "  FAILED: a parity gate was missed (see the rows marked MISSED)",
    ]
    return "\n".join(lines)


def _cache_lines(cache: dict | None) -> list[str]:
    """The step cache's decisions (F: the whole denoiser ran, c: the cached path), both sides."""
    if cache is None:
        return []

    def row(steps: list[bool] | None) -> str:
        return "".join("F" if full else "c" for full in steps or [])

    return [
        f"  {cache['policy']}: artifact {row(cache['full_steps'])}, reference {row(cache['reference_full_steps'])} "
        f"(F whole denoiser, c cached); same decisions: {_ok(cache['passed'])}"
    ]

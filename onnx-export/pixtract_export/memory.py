"""This process's memory (Linux /proc): the notes each export phase prints. A leaf: imports nothing from the
package."""

from __future__ import annotations


_RUN_PEAK_GB = 0.0


def run_peak_gb() -> float:
    """The largest peak RSS any memory_note saw (the kernel's own peak, and so /usr/bin/time -v's maximum resident
    set size, only covers the time since the last reset)."""
    return _RUN_PEAK_GB


def memory_note(reset_peak: bool = False) -> str:
    """This process's memory now (Linux): resident anonymous + file-backed (mapped safetensors) and the peak since the
    last reset. reset_peak=True then restarts the peak (writing 5 to /proc/self/clear_refs), so each phase of an
    export reports its own peak. The reset also restarts the peak that getrusage and /usr/bin/time -v report: the
    run's peak is the largest phase peak (run_peak_gb)."""
    global _RUN_PEAK_GB
    try:
        with open("/proc/self/status") as f:
            status = {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
        gb = lambda key: int(status[key].split()[0]) / 1e6  # kB -> GB
        _RUN_PEAK_GB = max(_RUN_PEAK_GB, gb("VmHWM"))
        note = (f"RSS {gb('VmRSS'):.2f} GB (anon {gb('RssAnon'):.2f}, file {gb('RssFile'):.2f}), "
                f"peak {gb('VmHWM'):.2f} GB")
        if reset_peak:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                note += " (peak reset)"
            except OSError:
                pass
        return note
    except (OSError, KeyError, ValueError):
        return "memory n/a"

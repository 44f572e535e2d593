"""The machine a benchmark runs on: the CPU, named in its JSON, and the `--device` flag.

This project's machines are cloud VMs whose host changes between sessions (an fp32 GEMM peak
of 331 GFLOP/s one day, 36 another): figures measured on different CPUs are not comparable, so
every bench names the one it ran on."""
import os
import platform


def cpu_name() -> str:
    """E.g. "AMD EPYC (family 23, model 1, 2 CPUs)", from /proc/cpuinfo where there is one.
    The family and model tell generations apart when a VM shows only a generic name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            fields = {key.strip(): value.strip() for key, value in
                      (line.split(":", 1) for line in f if ":" in line)}
    except OSError:
        return platform.processor() or platform.machine()
    return (f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')}, {os.cpu_count()} CPUs)")


def add_device_argument(parser):
    # Imported here: bench_data.py imports this module before torch on purpose (see there).
    from model.config import device_name

    parser.add_argument("--device", type=device_name, default="cpu",
                        help="cpu (default) or cuda; never chosen automatically")

import subprocess
import sys


def test_the_math_does_not_import_ray():
    code = (
        "import sys; import almdn_ray.mdn, almdn_ray.acquisition, almdn_ray.model, almdn_ray.engine, almdn_ray.cli; "
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_ray_import_in_the_math_would_be_seen():
    # The check above must be able to fail: importing ray does put it in sys.modules.
    code = "import sys, ray; assert 'ray' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_status_and_report_read_a_run_without_torch_or_ray():
    # `almdn-ray status` / `report` on a pool of millions must answer in seconds: no model code at import.
    code = (
        "import sys; import almdn_ray.cli, almdn_ray.report; "
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))[:5]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

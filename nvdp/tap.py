"""THE TAP writer of the harness: `ok N - name`, `not ok N - name` with
`#` diagnostics, `# SKIP`, the plan at the end and a summary line."""


class Tap:
    def __init__(self, suite=None):
        self.suite = suite
        self.n = self.passed = self.failed = self.skipped = 0

    def ok(self, cond, name, diag=None):
        self.n += 1
        if cond:
            self.passed += 1
        else:
            self.failed += 1
        print(f"{'ok' if cond else 'not ok'} {self.n} - {name}", flush=True)
        if not cond and diag:
            for line in str(diag).splitlines()[:15]:
                print(f"#   {line}", flush=True)
        return cond

    def skip(self, name, why):
        self.n += 1
        self.skipped += 1
        print(f"ok {self.n} - {name} # SKIP {why}", flush=True)

    def done(self):
        """Print the plan (and the summary); the exit status: 1 if anything
        failed or nothing passed."""
        print(f"1..{self.n}")
        if self.suite:
            print(f"{self.suite}: {self.passed} passed, {self.failed} failed"
                  + (f", {self.skipped} skipped" if self.skipped else ""))
        return 1 if self.failed or not self.passed else 0

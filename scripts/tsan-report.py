#!/usr/bin/python3
"""Count the ThreadSanitizer reports of make check-tsan (DIR/tsan.*).

A report is identified by its kind and the top frame of each access; it is
"ours" when any of its frames lies in hw/nvme/ (the code the series
touches).  Prints the counts and each distinct report of ours; exits 1 if
there is one.
"""
import collections
import glob
import os
import re
import sys

out = sys.argv[1]
frame = re.compile(r'^\s+#\d+ (\S+) (\S+)')
reports = []
for path in sorted(glob.glob(os.path.join(out, 'tsan.*'))):
    cur = None
    for line in open(path, errors='replace'):
        if line.startswith('WARNING: ThreadSanitizer:'):
            cur = {'kind': line.split(':', 2)[2].strip().split(' (')[0],
                   'tops': [], 'frames': [], 'text': [line]}
            want_top = True
            continue
        if cur is None:
            continue
        cur['text'].append(line)
        m = frame.match(line)
        if m:
            cur['frames'].append(m.group(2))
            if want_top:
                cur['tops'].append('%s %s' % (m.group(1),
                                              os.path.basename(m.group(2))))
                want_top = False
        elif line.strip() and not line.startswith(' '):
            want_top = True
        if line.startswith('SUMMARY: ThreadSanitizer'):
            reports.append(cur)
            cur = None

distinct = collections.OrderedDict()
for r in reports:
    key = (r['kind'],) + tuple(r['tops'][:2])
    ours = any('/hw/nvme/' in f for f in r['frames'])
    distinct.setdefault(key, [0, ours, r])[0] += 1

n_ours = [k for k, v in distinct.items() if v[1]]
print('tsan: %d reports, %d distinct; %d distinct with a frame in hw/nvme/, '
      '%d elsewhere (QEMU, glib)' % (len(reports), len(distinct), len(n_ours),
                                     len(distinct) - len(n_ours)))
for key, (count, ours, r) in distinct.items():
    print('tsan: %s %dx %s: %s' % ('OURS ' if ours else 'other', count,
                                   key[0], ' / '.join(key[1:])))
with open(os.path.join(out, 'ours.txt'), 'w') as f:
    for key in n_ours:
        f.write(''.join(distinct[key][2]['text']) + '\n')
sys.exit(1 if n_ours else 0)

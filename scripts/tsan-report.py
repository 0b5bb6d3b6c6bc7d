#!/usr/bin/python3
"""Count the ThreadSanitizer reports of make check-tsan (DIR/tsan.*).

A report is identified by its kind and the top frame of each access; it is
"ours" when the top frame of one of the two accesses lies in hw/nvme/ (the
code the series touches).  Reports whose racing accesses are elsewhere
(util/, block/, glib) but that have hw/nvme/ deeper in a stack are counted
apart: QEMU's own code reached from the device.  Prints the counts and each distinct report of ours; exits 1 if
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
                cur.setdefault('topfiles', []).append(m.group(2))
                want_top = False
        elif line.strip() and not line.startswith(' '):
            want_top = True
        if line.startswith('SUMMARY: ThreadSanitizer'):
            reports.append(cur)
            cur = None

distinct = collections.OrderedDict()
for r in reports:
    key = (r['kind'],) + tuple(r['tops'][:2])
    if any('/hw/nvme/' in f for f in r.get('topfiles', [])[:2]):
        where = 'nvme'
    elif any('/hw/nvme/' in f for f in r['frames']):
        where = 'via-nvme'
    else:
        where = 'other'
    distinct.setdefault(key, [0, where, r])[0] += 1

n_ours = [k for k, v in distinct.items() if v[1] == 'nvme']
n_via = [k for k, v in distinct.items() if v[1] == 'via-nvme']
print('tsan: %d reports, %d distinct: %d with a racing access in hw/nvme/, '
      '%d in QEMU code reached from hw/nvme/, %d elsewhere' %
      (len(reports), len(distinct), len(n_ours), len(n_via),
       len(distinct) - len(n_ours) - len(n_via)))
for key, (count, where, r) in sorted(distinct.items(),
                                     key=lambda kv: kv[1][1]):
    print('tsan: %-8s %3dx %s: %s' % (where, count, key[0],
                                      ' / '.join(key[1:])))
with open(os.path.join(out, 'ours.txt'), 'w') as f:
    for key in n_ours:
        f.write(''.join(distinct[key][2]['text']) + '\n')
sys.exit(1 if n_ours else 0)

#!/usr/bin/env python3
"""What holds glibc's heap pages in a running process (Linux, x86_64, glibc 2.3x).

    python3 bench/tools/glibc-heap-walk.py PID

Reads the process's memory through /proc/PID/mem (root, or the same user with ptrace
allowed) and walks the chunks of glibc's main arena ([heap]) and of each other arena (the
64 MiB-aligned anonymous mappings): live chunks, their bytes, the 4 KiB pages they touch
(a page with one live chunk stays resident; malloc_trim cannot give it back), their sizes,
and what they hold (the first printable run of each, digits shown as 9), most common first;
then how many live chunks start on each page, and what the sparse pages (3 or fewer) hold.

Used on a botvisor that `wa-footprint --linger` keeps running after a mass stop (issue 26):
it showed the pages held by user ids, phone numbers and push names spread among the freed
mailboxes of stopped session actors. Chunks in thread caches (tcache) count as live.
"""
import sys,re,struct,collections
pid=int(sys.argv[1])
maps=[]
for l in open(f"/proc/{pid}/maps"):
    p=l.split(); a,b=[int(x,16) for x in p[0].split('-')]
    maps.append((a,b,p[1],p[5] if len(p)>5 else ''))
mem=open(f"/proc/{pid}/mem",'rb',0)
def read(a,n):
    mem.seek(a); return mem.read(n)
def walk(data,base,start):
    off=start; chunks=[]
    while off+16<=len(data):
        size=struct.unpack_from('<Q',data,off+8)[0]
        sz=size&~7
        if sz<32 or sz%16 or off+sz>len(data): return chunks, off
        chunks.append([base+off,sz,size&1])
        off+=sz
    return chunks, off
def analyse(name,a,b):
    data=read(a,b-a)
    best=None
    for s in range(0,8192,16):
        ch,end=walk(data,a,s)
        if best is None or len(ch)>len(best[0]): best=(ch,end,s)
    ch,end,s=best
    # inuse of chunk i = prev_inuse bit of chunk i+1
    live=[]
    for i in range(len(ch)-1):
        if ch[i+1][2]: live.append((ch[i][0],ch[i][1]))
    top=ch[-1]
    livebytes=sum(sz for _,sz in live)
    pages=set()
    for addr,sz in live:
        for pg in range((addr+16)//4096,(addr+sz-1)//4096+1): pages.add(pg)
    print(f"{name}: start+{s} chunks {len(ch)} live {len(live)} livebytes {livebytes//1024} KiB, pages touched by live {len(pages)} ({len(pages)*4} KiB), top chunk {top[1]//1024} KiB, walked to {end} of {b-a}")
    hist=collections.Counter()
    for addr,sz in live: hist[sz]+=1
    print("  sizes:",hist.most_common(15))
    # What each live chunk holds (its first printable run, digits as 9), once; then the
    # kinds overall, and per page: how many live chunks start on it, and what the sparse
    # pages (the ones a few allocations keep resident) hold.
    kinds=collections.Counter(); on_page=collections.defaultdict(list)
    for addr,sz in live:
        d=data[addr-a+16:addr-a+sz]
        strs=re.findall(rb'[\x20-\x7e]{6,}',d)
        k=re.sub(r'\d','9',strs[0][:20].decode()) if strs else '-'
        kinds[(sz,k)]+=1
        on_page[(addr+16)//4096].append((sz,k))
    for (sz,k),n in kinds.most_common(40): print(f"   {n:6} x {sz:6}  {k}")
    per=collections.Counter(min(len(v),10) for v in on_page.values())
    print("  pages by live chunks starting on them (10 = 10 or more):",sorted(per.items()))
    sparse=collections.Counter()
    for v in on_page.values():
        if len(v)<=3:
            for sz,k in v: sparse[(sz,k)]+=1
    print("  what the pages with 3 or fewer live chunks hold:")
    for (sz,k),n in sparse.most_common(15): print(f"   {n:6} x {sz:6}  {k}")
    return live
for a,b,perm,name in maps:
    if perm.startswith('rw') and (name=='[heap]'):
        analyse('[heap]',a,b)
# non-main arenas: rw mappings aligned to 64MiB
for a,b,perm,name in maps:
    if perm.startswith('rw') and name=='' and a%(64<<20)==0 and (b-a)<(64<<20):
        analyse(f'arena@{a:x}',a,b)

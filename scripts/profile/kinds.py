#!/usr/bin/env python3
"""Sorts the lines of `perf report --no-children --sort dso,sym --stdio` into kinds
of work and prints the share of each (see run.sh). argv[1]: the target's name, to
tell the proxy's own binary from the rest."""
import re
import sys

# First match wins: (kind, pattern on the symbol).
KINDS = [
    ("io_uring", r"^(io_|__io_|io_uring|__do_sys_io_uring|__x64_sys_io_uring)"),
    ("epoll", r"(^ep_|epoll|^__ep_)"),
    ("splice, pipes", r"(splice|^pipe_|^__pipe|anon_pipe|^skb_splice|^spd_)"),
    ("copy to/from user", r"(copy_to_iter|copy_from_iter|copy_user|^_copy_|^copyout|^copyin|memcpy|memmove|^rep_movs|put_cmsg|check_object_size|check_heap_object|virt_addr_valid)"),
    ("TCP", r"^(tcp_|__tcp_|inet_csk|tcp4_|tcp6_|__inet_lookup|inet_ehash|inet6_)"),
    ("UDP", r"^(udp|__udp|__skb_recv_udp|ip_make_skb|__ip_append_data|ip6_make_skb|__ip6_append_data|inet_gso_segment|__udp_gso|skb_segment|__skb_gso)"),
    ("IP, netfilter, devices", r"^(ip_|__ip_|ip6_|__ip6_|ipv6_|nf_|__nf_|nft_|ipt_|dev_|__dev_|netif_|__netif_|net_rx|__napi|napi_|process_backlog|veth_|__netdev|skb_|__skb|kfree_skb|consume_skb|__kfree_skb|sk_|__sk_|sock_|__sock|lock_sock|release_sock|fib_|__fib|dst_|rt_|raw_|validate_xmit|sch_direct|__qdisc|rps_|enqueue_to_backlog|csum|__alloc_skb|alloc_skb|build_skb|__build_skb|pskb_|neigh_|eth_|__neigh|__copy_skb|get_netmem|put_netmem|do_softirq|handle_softirqs|__local_bh|____sys_sendmsg|___sys_sendmsg|____sys_recvmsg|___sys_recvmsg)"),
    ("syscall entry", r"^(entry_SYSCALL|do_syscall|syscall_|__x64_sys|__sys_|__se_sys|exit_to_user|syscall_exit|fdget|fput|__fget|__fput|fget|__fdget|security_|apparmor_|selinux_|bpf_lsm)"),
    ("scheduler, wakeups, locks", r"^(__raw_callee_save___pv_queued|__pv_queued|mutex_|__rcu_read|rcu_|schedule|__schedule|pick_next|try_to_wake|ttwu|wake_up|__wake_up|autoremove_wake|default_wake|enqueue_task|dequeue_task|update_curr|finish_task|psi_|native_queued_spin|_raw_spin|__raw_spin|queued_spin|raw_spin|set_next_entity|put_prev|select_task_rq|sched_|irqentry|asm_sysvec|sysvec_|__sysvec|flush_smp|smp_call|llist_|native_send_call|x2apic|__smp_call|do_idle|cpuidle|default_idle|poll_idle|arch_cpu_idle|task_work|__task_work)"),
    ("memory", r"^(kmem_|__kmem|kmalloc|__kmalloc|kfree|__slab|___slab|slab_|alloc_pages|__alloc_pages|free_pages|__free_pages|get_page|put_page|__folio|folio_|mem_cgroup|__mem_cgroup|memcg|page_|__page|rmqueue|__rmqueue|get_mem_cgroup|obj_cgroup|refill_obj|mod_memcg|__mod_memcg)"),
]
COMPILED = [(k, re.compile(p)) for k, p in KINDS]
LINE = re.compile(r"^\s*([0-9.]+)%\s+(\S+)\s+\[([.k])\]\s+(.*)$")


def kind(dso: str, mode: str, sym: str, target: str) -> str:
    if mode == ".":
        own = ("engine" in dso and target.startswith(("engine", "base"))) or (
            "haproxy" in dso and target == "haproxy")
        return "proxy's own code" if own else "user libraries (libc, vdso)"
    for k, p in COMPILED:
        if p.search(sym):
            return k
    return "other kernel"


def main() -> None:
    target = sys.argv[1] if len(sys.argv) > 1 else ""
    shares: dict[str, float] = {}
    top: dict[str, list[tuple[float, str]]] = {}
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        pct, dso, mode, sym = float(m[1]), m[2], m[3], m[4].strip()
        k = kind(dso, mode, sym, target)
        shares[k] = shares.get(k, 0.0) + pct
        top.setdefault(k, []).append((pct, sym))
    total = sum(shares.values())
    print(f"{'kind':<28}{'share':>8}  largest symbols")
    for k, v in sorted(shares.items(), key=lambda kv: -kv[1]):
        syms = ", ".join(s for _, s in sorted(top[k], reverse=True)[:3])
        print(f"{k:<28}{v:>7.1f}%  {syms[:90]}")
    print(f"{'(samples shown)':<28}{total:>7.1f}%")


if __name__ == "__main__":
    main()

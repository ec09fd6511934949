use aya_ebpf::{
    bindings::TC_ACT_PIPE,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use ipcluster_common::{
    COUNTER_COUNT, Counter, DEFAULT_FLOW_ENTRIES, FlowKey, FlowValue, MAX_SERVICES,
    MAX_WORKER_PORTS, META_INDEX, Meta, STEERING_ENTRIES, ServiceKey, ServiceValue,
    WorkerPortValue,
};

#[btf_map(name = "meta")]
static META: Array<Meta, 1> = Array::new();
#[btf_map(name = "services")]
static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();
#[btf_map(name = "steering")]
static STEERING: Array<u32, { STEERING_ENTRIES as usize }> = Array::new();
#[btf_map(name = "active")]
static ACTIVE: Array<u32, 1> = Array::new();
#[btf_map(name = "flows")]
static FLOWS: LruHashMap<FlowKey, FlowValue, { DEFAULT_FLOW_ENTRIES as usize }> = LruHashMap::new();
#[btf_map(name = "worker_ports")]
static WORKER_PORTS: HashMap<u32, WorkerPortValue, { MAX_WORKER_PORTS as usize }> = HashMap::new();
#[btf_map(name = "counters")]
static COUNTERS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
fn count(counter: Counter) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this program on this CPU writes it.
        unsafe { *c += 1 };
    }
}

#[classifier]
pub fn ipcluster_ingress(_ctx: TcContext) -> i32 {
    // Placeholder until the steering logic lands: touch every map the real
    // program reads so that the object carries them all, and pass the packet.
    let _ = META.get(META_INDEX);
    let _ = ACTIVE.get(0);
    let _ = STEERING.get(0);
    let _ = SERVICES.get_ptr(ServiceKey::default());
    let _ = FLOWS.get_ptr(FlowKey::default());
    count(Counter::Passed);
    TC_ACT_PIPE
}

#[classifier]
pub fn ipcluster_egress(_ctx: TcContext) -> i32 {
    let _ = WORKER_PORTS.get_ptr(0u32);
    let _ = FLOWS.get_ptr(FlowKey::default());
    count(Counter::Passed);
    TC_ACT_PIPE
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

//! CUDA C sources (compiled at run time by NVRTC) and the option sets each launcher compiles.

use super::attention::AttnConfig;
use super::ElemType;

pub(crate) const ATTENTION_SOURCE: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/attention.cu")
);
pub(crate) const MOE_SOURCE: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/moe.cu")
);

pub(crate) const QUANT_SOURCE: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/quant.cu")
);

/// One compilation unit: a source plus the `-D` options that specialise it.
#[derive(Debug, Clone)]
pub(crate) struct KernelModule {
    pub label: String,
    pub name: &'static str,
    pub source: &'static str,
    pub options: Vec<String>,
}

pub(crate) fn attention_module(elem: ElemType, head_dim: usize, cfg: &AttnConfig) -> KernelModule {
    KernelModule {
        label: format!("attention[{}, head_dim={head_dim}]", elem.name()),
        name: "attention",
        source: ATTENTION_SOURCE,
        options: vec![
            format!("-DELEM={}", elem.code()),
            format!("-DHEAD_DIM={head_dim}"),
            format!("-DFWD_BLOCK_M={}", cfg.fwd_m),
            format!("-DFWD_BLOCK_N={}", cfg.fwd_n),
            format!("-DFWD_RPT={}", cfg.fwd_rpt),
            format!("-DBWD_BLOCK_M={}", cfg.bwd_m),
            format!("-DBWD_BLOCK_N={}", cfg.bwd_n),
        ],
    }
}

pub(crate) fn moe_module(elem: ElemType, index_bits: u32) -> KernelModule {
    KernelModule {
        label: format!("moe[{}, int{index_bits}]", elem.name()),
        name: "moe",
        source: MOE_SOURCE,
        options: vec![
            format!("-DELEM={}", elem.code()),
            format!("-DIDX_BITS={index_bits}"),
        ],
    }
}

pub(crate) fn quant_module(elem: ElemType, bits: u32) -> KernelModule {
    KernelModule {
        label: format!("quant[{}, int{bits}]", elem.name()),
        name: "quant",
        source: QUANT_SOURCE,
        options: vec![format!("-DELEM={}", elem.code()), format!("-DBITS={bits}")],
    }
}

/// What `compile_check` compiles: every dtype, common head sizes at the tiles a Hopper-class GPU
/// (227 KiB of shared memory) and a small one (48 KiB) get, both index widths, and the INT4 / INT8
/// quantized GEMV.
pub(crate) fn check_modules() -> Vec<KernelModule> {
    let mut modules = Vec::new();
    for elem in ElemType::ALL {
        for head_dim in [64, 128] {
            let cfg = AttnConfig::choose(head_dim, 227 * 1024).expect("fits");
            modules.push(attention_module(elem, head_dim, &cfg));
        }
        modules.push(moe_module(elem, 64));
        for bits in [4, 8] {
            modules.push(quant_module(elem, bits));
        }
    }
    let small = AttnConfig::choose(256, 99 * 1024).expect("fits");
    modules.push(attention_module(ElemType::BF16, 256, &small));
    modules.push(moe_module(ElemType::BF16, 32));
    modules
}

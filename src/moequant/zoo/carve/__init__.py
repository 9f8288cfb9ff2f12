"""``moequant zoo build moe``: carve a dense zoo model into a stock transformers MoE (see ``build``)."""

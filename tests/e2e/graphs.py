"""API-format prompts the end-to-end tests post (node ids are strings; links are [node_id, output_index])."""


def flux_sample(model_node: dict, prefix: str, seed: int = 0, steps: int = 2, size: int = 64) -> dict:
    """Sample a small FLUX latent with test conditioning and save it; `model_node` holds nodes "1".. giving MODEL
    at ["1", 0]."""
    prompt = dict(model_node)
    prompt.update({
        "10": {"class_type": "FP16LRTestConditioning",
               "inputs": {"seed": 7, "tokens": 8, "width": 4096, "pooled": 768, "guidance": 3.5}},
        "11": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "12": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "denoise": 1.0, "positive": ["10", 0], "negative": ["10", 0],
            "latent_image": ["11", 0]}},
        "13": {"class_type": "FP16LRTestSaveTensors", "inputs": {"filename": prefix, "latent": ["12", 0]}},
    })
    return prompt


def encode(clip_nodes: dict, prefix: str, text: str = "a photo of a red fox in the snow, highly detailed") -> dict:
    prompt = dict(clip_nodes)
    prompt.update({
        "20": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": text}},
        "21": {"class_type": "FP16LRTestSaveTensors", "inputs": {"filename": prefix, "conditioning": ["20", 0]}},
    })
    return prompt


def convert(model: str, output_name: str, num_iter: int = 0, t5xxl: bool = False, overwrite: bool = True,
            node_id: str = "0") -> dict:
    return {node_id: {"class_type": "ScaledFP16Convert", "inputs": {
        "model": model, "num_iter": num_iter, "top_k": 1, "calib_samples": 3072, "t5xxl": t5xxl,
        "keep_distillation": False, "output_name": output_name, "overwrite": overwrite}}}


def save_model(model_link: list, output_name: str, node_id: str = "30") -> dict:
    return {node_id: {"class_type": "ScaledFP16SaveModel", "inputs": {
        "model": model_link, "num_iter": 0, "top_k": 1, "calib_samples": 3072, "t5xxl": False,
        "keep_distillation": False, "output_name": output_name, "overwrite": True}}}

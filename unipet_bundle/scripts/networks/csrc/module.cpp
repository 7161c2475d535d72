// The Python bindings of the fused CPU kernels (scripts/networks/fused_pad.py builds this with the kernels' sources).
#include <torch/extension.h>

torch::Tensor scale_pad(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& slope, int64_t p);
torch::Tensor depthwise3_replicate(const torch::Tensor& x, const torch::Tensor& weight, bool channel_sum);
torch::Tensor single_channel_conv3_replicate(const torch::Tensor& x, const torch::Tensor& weight,
                                             const c10::optional<torch::Tensor>& bias);
std::vector<torch::Tensor> depthwise3_project_prelu(const torch::Tensor& x, const torch::Tensor& weight,
                                                    const torch::Tensor& proj, double slope);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // no Python object is touched inside: other Python threads run meanwhile
  m.def("scale_pad", &scale_pad, "edge-replicate padding of PReLU(x) * scale in one pass (channels-last, float32)",
        py::call_guard<py::gil_scoped_release>());
  m.def("depthwise3_replicate", &depthwise3_replicate,
        "depthwise 3x3x3 convolution of the edge-replicated input, optionally summed over channels (channels-last, "
        "float32)",
        py::call_guard<py::gil_scoped_release>());
  m.def("single_channel_conv3_replicate", &single_channel_conv3_replicate,
        "3x3x3 convolution of an edge-replicated single-channel input to C channels, plus a bias (channels-last out, "
        "float32)",
        py::call_guard<py::gil_scoped_release>());
  m.def("depthwise3_project_prelu", &depthwise3_project_prelu,
        "PReLU of a 1x1 projection of a depthwise 3x3x3 convolution of the edge-replicated input, and its channel "
        "means (channels-last, float32)",
        py::call_guard<py::gil_scoped_release>());
}

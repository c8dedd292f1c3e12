"""Elementwise ops: broadcasting arithmetic, unary maps and dtype casts.

Each backward maps ``g = dL/dout`` to the input gradients (the derivation is the comment
above it); a broadcast input's gradient is ``unbroadcast`` back to its shape.
"""

from __future__ import annotations

from handgrad import backend as B
from handgrad.function import Function, check_broadcastable, unbroadcast

# ----------------------------------------------------------------------------------------
# arithmetic (broadcasting)


class Add(Function):
    # out = a + b  =>  da = g, db = g (each unbroadcast to its input's shape)
    def forward(self, a, b):
        check_broadcastable(a.shape, b.shape, "add")
        self.sa, self.sb = a.shape, b.shape
        return a + b

    def backward(self, g):
        return unbroadcast(g, self.sa), unbroadcast(g, self.sb)


class Sub(Function):
    # out = a - b  =>  da = g, db = -g
    def forward(self, a, b):
        check_broadcastable(a.shape, b.shape, "sub")
        self.sa, self.sb = a.shape, b.shape
        return a - b

    def backward(self, g):
        db = -unbroadcast(g, self.sb) if self.needs_input_grad[1] else None
        return unbroadcast(g, self.sa), db


class Mul(Function):
    # out = a * b  =>  da = g * b, db = g * a
    def forward(self, a, b):
        check_broadcastable(a.shape, b.shape, "mul")
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        da = unbroadcast(g * self.b, self.a.shape) if self.needs_input_grad[0] else None
        db = unbroadcast(g * self.a, self.b.shape) if self.needs_input_grad[1] else None
        return da, db


class Div(Function):
    # out = a / b  =>  da = g / b, db = -g * a / b^2 = -g * out / b
    def forward(self, a, b):
        check_broadcastable(a.shape, b.shape, "div")
        self.a, self.b = a, b
        out = a / b
        if not (B.is_floating(a.dtype) or B.is_floating(b.dtype)):
            out = out.astype(B.default_float)  # int / int is float32 as in torch, not float64
        return out

    def backward(self, g):
        a, b = self.a, self.b
        da = unbroadcast(g / b, a.shape) if self.needs_input_grad[0] else None
        db = unbroadcast(-g * a / (b * b), b.shape) if self.needs_input_grad[1] else None
        return da, db


class Pow(Function):
    autocast = "float32"  # inside hg.autocast (handgrad.amp)

    # out = a^b  =>  da = g * b * a^(b-1), db = g * a^b * ln(a)
    def forward(self, a, b):
        check_broadcastable(a.shape, b.shape, "pow")
        self.a, self.b = a, b
        self.out = a**b
        return self.out

    def backward(self, g):
        a, b = self.a, self.b
        da = unbroadcast(g * b * a ** (b - 1), a.shape) if self.needs_input_grad[0] else None
        db = None
        if self.needs_input_grad[1]:
            # ln(a) is undefined for a <= 0; torch returns nan there too, we match it.
            with B.ignore_float_errors():
                db = unbroadcast(g * self.out * B.get_array_module(a).log(a), b.shape)
        return da, db


class Neg(Function):
    # out = -a  =>  da = -g
    def forward(self, a):
        return -a

    def backward(self, g):
        return (-g,)


# ----------------------------------------------------------------------------------------
# unary maps


class Exp(Function):
    autocast = "float32"  # inside hg.autocast (handgrad.amp)

    # out = e^a  =>  da = g * out
    def forward(self, a):
        self.out = B.get_array_module(a).exp(a)
        return self.out

    def backward(self, g):
        return (g * self.out,)


class Log(Function):
    autocast = "float32"  # inside hg.autocast (handgrad.amp)

    # out = ln a  =>  da = g / a
    def forward(self, a):
        self.a = a
        return B.get_array_module(a).log(a)

    def backward(self, g):
        return (g / self.a,)


class Sqrt(Function):
    # out = sqrt(a)  =>  da = g / (2 out)
    def forward(self, a):
        self.out = B.get_array_module(a).sqrt(a)
        return self.out

    def backward(self, g):
        return (g / (2 * self.out),)


class Tanh(Function):
    # out = tanh(a)  =>  da = g * (1 - out^2)
    def forward(self, a):
        self.out = B.get_array_module(a).tanh(a)
        return self.out

    def backward(self, g):
        return (g * (1 - self.out * self.out),)


class Sigmoid(Function):
    # out = 1 / (1 + e^-a)  =>  da = g * out * (1 - out)
    def forward(self, a):
        # overflow-free form of the logistic
        self.out = 0.5 * (1 + B.get_array_module(a).tanh(0.5 * a))
        return self.out

    def backward(self, g):
        return (g * self.out * (1 - self.out),)


class Relu(Function):
    # out = max(a, 0)  =>  da = g * [a > 0]
    def forward(self, a):
        self.mask = a > 0
        return B.get_array_module(a).where(self.mask, a, 0).astype(a.dtype, copy=False)

    def backward(self, g):
        return (g * self.mask,)


class Abs(Function):
    # out = |a|  =>  da = g * sign(a)
    def forward(self, a):
        self.a = a
        return B.get_array_module(a).abs(a)

    def backward(self, g):
        return (g * B.get_array_module(self.a).sign(self.a),)


class Cast(Function):
    # out = a converted to another dtype  =>  da = g converted back
    native = True

    def forward(self, a, dtype):
        self.dtype = a.dtype
        return a.astype(dtype)

    def backward(self, g):
        return (g.astype(B.compute_dtype(self.dtype), copy=False),)
